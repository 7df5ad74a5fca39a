"""`chatmail backup` and `chatmail restore`: one archive of what a relay cannot make again.

In the archive (a gzip-compressed tar file, mode 0600), each with its owner, mode and
modification time:

- chatmail.ini;
- the DKIM keys (<dkim_key_dir>/*.private, with the marker of a key adopted from
  cmdeploy) and the list of keys of `chatmail dkim rotate` (<state_dir>/dkim-keys);
- the certificate: certbot's directory (its ACME account, certificates and renewal
  settings) in acme mode, the admin's two files in external mode (a self-signed one is
  made again);
- the TURN secret (coturn's shared secret, which credentials in use derive from);
- every account: its mailbox directory with the password hash (whose modification time
  is the day of the last login), the marker that refuses incoming cleartext and
  metadata.json (push tokens); the mail itself only with --with-mail (the relay deletes
  it within days anyway). Dovecot's indexes are never saved: it rebuilds them.

Everything else (configuration files, OpenDKIM's tables, units) `chatmail configure`
makes again from these. The first member, chatmail-backup.json, says what the archive is.

The relay keeps running while the backup is made. Each file is read whole through one
open file and its metadata taken from that same file: the files the relay rewrites
(password hashes, metadata.json, dkim-keys, certbot's certificates) are replaced by
renaming a complete new file, so each is saved either as it was or as it became. Files
that disappear meanwhile (mail deleted by expiry, an account removed) are left out;
mail arriving meanwhile may or may not be in it.

`chatmail restore` takes only members below the places listed above (as the archive's
chatmail.ini and this host's platform name them), writes each atomically with its owner
looked up by name on this host, refuses to replace a different relay (another mail
domain, or accounts here that the archive does not have) unless forced, and then runs
`chatmail configure`.
"""

import grp
import io
import json
import os
import pwd
import socket
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError, parse_ini_params
from ..files import write_atomic
from .dkimrotate import KEYS_FILE

MANIFEST = "chatmail-backup.json"
FORMAT = 1
# What a mailbox directory holds besides mail (chatmaild.mailbox).
ACCOUNT_FILES = ("password", "enforceE2EEincoming", "metadata.json")
# The marker steps/dkim-key leaves once it adopted cmdeploy's opendkim.private.
ADOPTED_KEY_MARKER = ".chatmail-adopted-legacy-key"
# Dovecot's index and cache files: rewritten in place while it runs, rebuilt when missing.
DOVECOT_INDEX_PREFIXES = ("dovecot.index", "dovecot.list.index")
# How many daily backups `chatmail backup --daily` keeps.
DAILY_KEPT = 7
DAILY_PREFIX = "chatmail-backup-"


class BackupError(Exception):
    """The backup or restore cannot be done; the message says why and what to do."""


# -- what is saved -------------------------------------------------------------------------


@dataclass(frozen=True)
class Places:
    """Where the saved things live on a relay with CONFIG on PLATFORM: single files,
    and folders saved as a whole (or, for the mailboxes, in part)."""

    ini: str
    files: tuple  # (path, what it is)
    folders: tuple
    dkim_key_dir: str
    mailboxes_dir: str

    def allows(self, path):
        """Whether PATH is one of these places (restore writes nothing else)."""
        inside = (self.dkim_key_dir, self.mailboxes_dir, *self.folders)
        return (path in (self.ini, *(path for path, _ in self.files))
                or any(path == top or path.startswith(top + "/") for top in inside))


def places(config, platform):
    files = [(f"{platform.state_dir}/{KEYS_FILE}", "DKIM key list"),
             (str(config.turn_secret_path), "TURN secret")]
    folders = []
    if config.tls_cert_mode == "acme":
        folders.append(certbot_dir(platform))
    elif config.tls_cert_mode == "external":
        files += [(config.tls_cert_path, "certificate files"),
                  (config.tls_key_path, "certificate files")]
    return Places(str(config.inipath), tuple(files), tuple(folders), platform.dkim_key_dir,
                  str(config.mailboxes_dir))


def certbot_dir(platform):
    """certbot's configuration directory, whose live/ the platform names."""
    return str(Path(platform.certbot_live_dir).parent)


def is_dkim_key_file(name):
    return name.endswith(".private") or name == ADOPTED_KEY_MARKER


def is_skipped_with_mail(relative):
    """Saved with --with-mail, but not: Dovecot's indexes and unfinished deliveries."""
    parts = relative.split("/")
    return parts[-1].startswith(DOVECOT_INDEX_PREFIXES) or "tmp" in parts[:-1]


# -- writing an archive --------------------------------------------------------------------


@dataclass
class Archive:
    """A tar file being written: members named by their absolute path without the '/'."""

    tar: object
    counts: dict = field(default_factory=dict)

    def add(self, path, what):
        """PATH (file, symbolic link or directory entry alone); False if it is gone."""
        try:
            if os.path.islink(path) or os.path.isdir(path):
                info = self.tar.gettarinfo(path, arcname=path.lstrip("/"))
                self.tar.addfile(info)
            else:
                with open(path, "rb") as f:
                    info = self.tar.gettarinfo(fileobj=f, arcname=path.lstrip("/"))
                    data = f.read()
                info.size = len(data)
                self.tar.addfile(info, io.BytesIO(data))
        except FileNotFoundError:
            return False
        self.counts[what] = self.counts.get(what, 0) + 1
        return True

    def add_tree(self, top, what, skip=lambda relative: False):
        """TOP and everything below it, except what SKIP(path relative to TOP) says."""
        if not self.add(top, what):
            return
        for folder, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, top)
                if not skip(relative):
                    self.add(path, what)


def mailbox_directories(mailboxes_dir):
    """The accounts' directories (<addr>, as chatmail-expire finds them)."""
    try:
        entries = sorted(os.scandir(mailboxes_dir), key=lambda entry: entry.name)
    except FileNotFoundError:
        return []
    return [entry.path for entry in entries
            if "@" in entry.name and entry.is_dir(follow_symlinks=False)]


def add_accounts(archive, mailboxes_dir, with_mail):
    for mailbox in mailbox_directories(mailboxes_dir):
        if with_mail:
            archive.add_tree(mailbox, "account and mail files", skip=is_skipped_with_mail)
        elif archive.add(mailbox, "accounts"):
            for name in ACCOUNT_FILES:
                archive.add(os.path.join(mailbox, name), "account files")


def add_relay(archive, config, platform, with_mail):
    where = places(config, platform)
    archive.add(where.ini, "chatmail.ini")
    for path, what in where.files:
        archive.add(path, what)
    try:
        key_files = sorted(name for name in os.listdir(where.dkim_key_dir)
                           if is_dkim_key_file(name))
    except FileNotFoundError:
        key_files = []
    for name in key_files:
        archive.add(f"{where.dkim_key_dir}/{name}", "DKIM keys")
    for folder in where.folders:
        archive.add_tree(folder, "certbot files")
    add_accounts(archive, where.mailboxes_dir, with_mail)


def manifest(config, with_mail, now):
    return {"format": FORMAT, "mail_domain": config.mail_domain_bare,
            "ini": str(config.inipath), "created": int(now), "host": socket.gethostname(),
            "with_mail": with_mail}


def add_manifest(tar, data):
    text = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
    info = tarfile.TarInfo(MANIFEST)
    info.size, info.mode, info.mtime = len(text), 0o600, data["created"]
    tar.addfile(info, io.BytesIO(text))


class Discard(io.RawIOBase):
    """Where a dry run writes its archive."""

    def writable(self):
        return True

    def write(self, data):
        return len(data)


def count_backup(config, platform, with_mail=False):
    """What an archive would hold, counted by kind, without writing one (--dry-run)."""
    with tarfile.open(fileobj=Discard(), mode="w|") as tar:
        archive = Archive(tar)
        add_relay(archive, config, platform, with_mail)
    return archive.counts


def write_backup(config, platform, target, with_mail=False, now=time.time):
    """The archive at TARGET (a new file, mode 0600, complete or absent); returns what
    it holds, counted by kind."""
    target = Path(target)
    if target.exists():
        raise BackupError(f"{target} exists; give a new file name")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent} is not a directory")
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w:gz") as tar:
                add_manifest(tar, manifest(config, with_mail, now()))
                archive = Archive(tar)
                add_relay(archive, config, platform, with_mail)
            f.flush()
            os.fsync(f.fileno())
        os.link(scratch, target)  # never over a file made meanwhile
    finally:
        os.unlink(scratch)
    return archive.counts


def daily_backup(config, platform, now=time.time):
    """`chatmail backup --daily`: a new archive in backup_dir, the oldest beyond
    DAILY_KEPT removed; None when backup_dir is not set."""
    if not config.backup_dir:
        return None
    folder = Path(config.backup_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now()))
    target = folder / f"{DAILY_PREFIX}{config.mail_domain_bare}-{stamp}.tar.gz"
    counts = write_backup(config, platform, target, now=now)
    old = sorted(folder.glob(f"{DAILY_PREFIX}{config.mail_domain_bare}-*.tar.gz"))
    for path in old[:-DAILY_KEPT]:
        path.unlink()
    return target, counts


# -- restoring -----------------------------------------------------------------------------


@dataclass
class Backup:
    """An archive opened for restoring: its manifest, its chatmail.ini as a Config (read
    as if at INI_PATH), and its members."""

    manifest: dict
    config: object
    members: list  # TarInfo, manifest excluded
    tar: object

    def data(self, member):
        return self.tar.extractfile(member).read()


def open_backup(path, ini_path):
    try:
        tar = tarfile.open(path, "r:gz")
        members = tar.getmembers()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BackupError(f"{path} is not a chatmail backup: {exc}") from None
    if not members or members[0].name != MANIFEST:
        raise BackupError(f"{path} is not a chatmail backup (no {MANIFEST} first)")
    data = json.loads(tar.extractfile(members[0]).read())
    if data.get("format") != FORMAT:
        raise BackupError(f"{path} has backup format {data.get('format')}; this version "
                          f"reads format {FORMAT}")
    by_name = {member.name: member for member in members[1:]}
    ini = by_name.get(data["ini"].lstrip("/"))
    if ini is None:
        raise BackupError(f"{path} holds no chatmail.ini")
    text = tar.extractfile(ini).read().decode("utf-8")
    try:
        config = Config(ini_path, parse_ini_params(text, ini_path))
    except ConfigError as exc:
        raise BackupError(f"the backup's chatmail.ini is not valid here: {exc}") from None
    return Backup(data, config, members[1:], tar)


def target_path(backup, member, ini_path):
    """Where MEMBER goes: the archive's chatmail.ini to INI_PATH, the rest where it was."""
    if member.name == backup.manifest["ini"].lstrip("/"):
        return str(ini_path)
    return "/" + member.name


def unsafe_members(backup, platform, ini_path):
    """Problems with members restore must not write: outside the places it restores,
    climbing out with '..', special files, links pointing out of their folder."""
    where = places(backup.config, platform)
    problems = []
    for member in backup.members:
        path = target_path(backup, member, ini_path)
        if ".." in member.name.split("/") or member.name.startswith("/"):
            problems.append(f"{member.name}: not a plain path")
        elif not where.allows(path):
            problems.append(f"{member.name}: not something a backup holds")
        elif not (member.isfile() or member.isdir() or member.issym()):
            problems.append(f"{member.name}: not a file, directory or symbolic link")
        elif member.issym() and not link_stays_inside(member, where):
            problems.append(f"{member.name}: a link to {member.linkname}")
    return problems


def link_stays_inside(member, where):
    """certbot's live/ links point into its archive/: a link must stay in its folder."""
    target = os.path.normpath(os.path.join("/" + os.path.dirname(member.name),
                                           member.linkname))
    return any(target.startswith(folder + "/") for folder in where.folders)


def missing_owners(backup):
    """Users and groups the archive's files belong to that this host lacks."""
    missing = set()
    for member in backup.members:
        for lookup, name in ((pwd.getpwnam, member.uname), (grp.getgrnam, member.gname)):
            try:
                lookup(name)
            except KeyError:
                missing.add(name)
    return sorted(missing)


def existing_domain(ini_path):
    try:
        text = Path(ini_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return parse_ini_params(text, ini_path).get("mail_domain", "").strip() or None


def other_relay(backup, ini_path):
    """Why this host is a different relay that restoring would replace; [] if it is a
    fresh install (or this relay itself)."""
    problems = []
    domain = existing_domain(ini_path)
    if domain and domain != backup.config.mail_domain_bare:
        problems.append(f"this host is the relay {domain}, the backup is of "
                        f"{backup.config.mail_domain_bare}")
    saved = {"/" + member.name for member in backup.members}
    unknown = [path for path in mailbox_directories(backup.config.mailboxes_dir)
               if path not in saved]
    if unknown:
        problems.append(f"{len(unknown)} account(s) here are not in the backup, e.g. "
                        f"{os.path.basename(unknown[0])}")
    return problems


def check_restore(backup, platform, ini_path, force):
    """Raises BackupError unless the archive may be restored here."""
    problems = unsafe_members(backup, platform, ini_path)
    if problems:
        raise BackupError("the archive holds what a chatmail backup does not, nothing "
                          "was restored:\n" + "\n".join(f"  {p}" for p in problems[:10]))
    missing = missing_owners(backup)
    if missing:
        raise BackupError(f"the users or groups {', '.join(missing)} do not exist here: "
                          "install chatmail-relay first, then restore")
    replaced = other_relay(backup, ini_path)
    if replaced and not force:
        raise BackupError("not restoring over another relay (--force does): "
                          + "; ".join(replaced))


def restore_member(backup, member, path):
    """One member at PATH, replacing what is there in one step."""
    uid, gid = pwd.getpwnam(member.uname).pw_uid, grp.getgrnam(member.gname).gr_gid
    if member.isdir():
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chown(path, uid, gid)
        os.chmod(path, stat.S_IMODE(member.mode))
        return
    Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if member.issym():
        scratch = f"{path}.chatmail-restore"
        if os.path.lexists(scratch):
            os.unlink(scratch)
        os.symlink(member.linkname, scratch)
        os.lchown(scratch, uid, gid)
        os.replace(scratch, path)
        return
    write_atomic(path, backup.data(member), stat.S_IMODE(member.mode), gid)
    os.chown(path, uid, gid)
    os.utime(path, (member.mtime, member.mtime))


def restore(backup, ini_path, out=print):
    """Write every member (directories first, as the archive lists them); the
    directories' modification times last, after their contents changed them."""
    for member in backup.members:
        restore_member(backup, member, target_path(backup, member, ini_path))
    for member in backup.members:
        if member.isdir():
            os.utime(target_path(backup, member, ini_path), (member.mtime, member.mtime))
    out(f"Restored {len(backup.members)} files of {backup.config.mail_domain_bare} "
        f"(backup of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(backup.manifest['created']))}"
        f" on {backup.manifest['host']}).")


def reloaded_after_restore(config):
    """The daemons that read the restored keys and certificates only when they start or
    reload (names as `chatmail configure --reload` takes them)."""
    return ["dovecot", "postfix", "nginx"] + ([] if config.ipv4_relay else ["opendkim"])


def summary(counts):
    return ", ".join(f"{count} {what}" for what, count in counts.items())

