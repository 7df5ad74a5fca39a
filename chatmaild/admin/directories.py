"""The directories the relay's services write to, with their owners and modes, made (or
put right) by every `chatmail configure`."""

import os

MAILBOXES_RECORD = "mailboxes-dir"


def install_dir(host, path, mode, owner=None):
    """PATH with MODE and OWNER (user and group of that name; default root), its missing
    parents made as root with mode 755, as `install -d` does."""
    where = host.path(path)
    where.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(where, mode)
    uid, gid = host.user_ids(owner) if owner else (0, 0)
    os.chown(where, uid, gid)


def make_directories(config, platform, host):
    vmail = platform.vmail_user
    install_dir(host, platform.vmail_home, 0o755, vmail)
    # Mailboxes are private to the services running as vmail (doveauth, Dovecot,
    # filtermail). Their parent (/home/vmail/mail by default, which holds every domain's
    # mailboxes) is made private too, but only when it is new: mailboxes_dir = /srv/mail
    # must not hand /srv to vmail.
    parent = os.path.dirname(str(config.mailboxes_dir))
    if not host.path(parent).is_dir():
        install_dir(host, parent, 0o700, vmail)
    install_dir(host, config.mailboxes_dir, 0o700, vmail)
    for path in (platform.state_dir, platform.web_root, platform.acme_webroot):
        install_dir(host, path, 0o755)
    install_dir(host, f"{platform.state_dir}/reports", 0o750, vmail)
    if config.backup_dir:
        # The daily backup's archives, root's alone; its sandbox may write only there
        # (conf/backup), so the directory must exist before it starts.
        install_dir(host, config.backup_dir, 0o700)
    # For the package's purge, which asks whether to delete the mailboxes, and may run
    # after python3-chatmaild, which reads chatmail.ini, is gone.
    host.path(f"{platform.state_dir}/{MAILBOXES_RECORD}").write_text(
        f"{config.mailboxes_dir}\n")
    if not config.ipv4_relay:
        # OpenDKIM's socket lives inside Postfix's chroot; Postfix reaches it as a member
        # of the opendkim group.
        install_dir(host, f"{platform.postfix_queue_dir}/opendkim", 0o750,
                    platform.opendkim_user)
        install_dir(host, platform.dkim_key_dir, 0o750, platform.opendkim_user)
    # Dovecot makes Postfix's SASL and LMTP sockets in private/, which Postfix creates
    # only when it first starts (so on Debian 13 with "No configuration" it is missing);
    # Dovecot starts first. Owner and mode as Postfix's postfix-files sets them (group
    # root there too).
    private = f"{platform.postfix_queue_dir}/private"
    if not host.path(private).is_dir():
        install_dir(host, private, 0o700)
        os.chown(host.path(private), host.user_ids("postfix")[0], 0)
