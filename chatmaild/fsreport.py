"""chatmail-fsreport: how much the mailboxes store, and how many addresses are in use.

    chatmail-fsreport                       summary of /etc/chatmail/chatmail.ini's relay
    chatmail-fsreport --mdir cur            message sizes of cur/ folders only
    chatmail-fsreport --min-login-age 30    message sizes of addresses idle for 30 days
    chatmail-fsreport --textfile /var/lib/prometheus/node-exporter/
                                            write fsreport.prom for node_exporter instead

Addresses starting with `ci-` are test accounts and are counted apart from real users.
The mailboxes are read as chatmail-expire reads them (`*@*` entries, no symbolic links).
"""

import os
import sys
import time
from argparse import ArgumentParser
from datetime import datetime, timezone

from .config import ConfigError, read_config
from .expire import add_ini_and_days_arguments, iter_mailboxes
from .files import write_atomic

DAY = 86400
KIB = 1024
MIB = 1024 * KIB
MESSAGE_SIZE_THRESHOLDS = (0, 100 * KIB, MIB // 2, 1 * MIB, 2 * MIB, 5 * MIB, 10 * MIB)
ACTIVITY_DAYS = (1, 10, 30, 40, 80, 100, 150)
CI_PREFIX = "ci-"
TEXTFILE_NAME = "fsreport.prom"
LEGACY_METRICS_PATH = "/var/www/html/metrics"


def human_size(size):
    """Bytes in decimal kilo-, mega- or gigabytes, right-aligned for tables."""
    if size < 10000:
        return f"{size / 1000:5.2f}K"
    if size < 1000 * 1000:
        return f"{size / 1000:5.0f}K"
    if size < 1000 * 1000 * 1000:
        return f"{size // 1000000:5d}M"
    return f"{size / 1000000000:5.2f}G"


def percent(part, whole):
    return part / whole * 100 if whole else 0.0


class Report:
    """Storage and login totals over the mailboxes it is given."""

    def __init__(self, now, min_login_age=0, mdir=None):
        self.now = now
        self.min_login_age = min_login_age
        self.mdir = mdir
        self.size_messages = 0
        self.size_extra = 0
        self.num_all_logins = 0
        self.num_ci_logins = 0
        self.active_within = {days: 0 for days in ACTIVITY_DAYS}
        self.message_bytes = {size: 0 for size in MESSAGE_SIZE_THRESHOLDS}
        self.message_count = {size: 0 for size in MESSAGE_SIZE_THRESHOLDS}

    @property
    def num_user_logins(self):
        return self.num_all_logins - self.num_ci_logins

    def process_mailbox(self, scan):
        self.size_messages += sum(message.size for message in scan.messages)
        self.size_extra += sum(entry.size for entry in scan.extrafiles)
        if scan.last_login is None:  # no account (yet): storage only
            return
        self.count_login(scan.name, scan.last_login)
        if scan.last_login <= self.now - self.min_login_age * DAY:
            self.count_message_sizes(scan.messages)

    def count_login(self, name, last_login):
        self.num_all_logins += 1
        if name.startswith(CI_PREFIX):
            self.num_ci_logins += 1
            return
        for days in ACTIVITY_DAYS:
            if last_login >= self.now - days * DAY:
                self.active_within[days] += 1

    def count_message_sizes(self, messages):
        for message in messages:
            if self.mdir and message.subdir != self.mdir:
                continue
            for threshold in MESSAGE_SIZE_THRESHOLDS:
                if message.size >= threshold:
                    self.message_bytes[threshold] += message.size
                    self.message_count[threshold] += 1

    def summary_lines(self):
        total = self.size_messages + self.size_extra
        extra_share = percent(self.size_extra, total) if total else 100.0
        lines = [
            "",
            "## Mailbox storage use analysis",
            f"Mailbox data total size: {human_size(total)}",
            f"Messages total size    : {human_size(self.size_messages)}",
            f"Extra files : {human_size(self.size_extra)} ({extra_share:.2f}%)",
            "",
        ]
        if self.min_login_age:
            lines.append(f"### Message storage for {self.min_login_age} days old logins")
        prefix = f"[{self.mdir}] " if self.mdir else ""
        for threshold in MESSAGE_SIZE_THRESHOLDS:
            size = self.message_bytes[threshold]
            lines.append(
                f"{prefix}larger than {human_size(threshold)}: {human_size(size)} "
                f"({percent(size, self.size_messages):.2f}%), "
                f"{self.message_count[threshold]} msgs"
            )
        reference = datetime.fromtimestamp(self.now, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        users = self.num_user_logins
        lines += [
            "",
            f"## Login stats, from date reference {reference}",
            f"all:     {self.num_all_logins}",
            f"non-ci:  {users}",
            f"ci:      {self.num_ci_logins}",
        ]
        for days in ACTIVITY_DAYS:
            active = self.active_within[days]
            share = f"({percent(active, users):.2f}%)" if users else "100%"
            lines.append(f"last {days:3} days: {active} {share}")
        return lines

    def prometheus_text(self):
        """The totals in Prometheus' text exposition format (node_exporter textfile)."""
        lines = []

        def gauge(name, help_text, samples):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            for label, value in samples:
                lines.append(f"{name}{{{label}}} {value}")

        total = self.size_messages + self.size_extra
        gauge("chatmail_storage_bytes", "Mailbox storage in bytes.", [
            ('kind="messages"', self.size_messages),
            ('kind="extra"', self.size_extra),
            ('kind="total"', total),
        ])
        gauge("chatmail_messages_bytes", "Sum of msg bytes >= threshold.", [
            (f'min_size="{size}"', self.message_bytes[size]) for size in MESSAGE_SIZE_THRESHOLDS
        ])
        gauge("chatmail_messages_count", "Number of msgs >= size threshold.", [
            (f'min_size="{size}"', self.message_count[size]) for size in MESSAGE_SIZE_THRESHOLDS
        ])
        gauge("chatmail_accounts", "Number of accounts.", [
            ('kind="all"', self.num_all_logins),
            ('kind="ci"', self.num_ci_logins),
            ('kind="user"', self.num_user_logins),
        ])
        gauge("chatmail_accounts_active", "Non-CI accounts active within N days.", [
            (f'days="{days}"', self.active_within[days]) for days in ACTIVITY_DAYS
        ])
        return "\n".join(lines) + "\n"

    def legacy_metrics_text(self):
        """The format of upstream's former chatmail-metrics, for old dashboards."""
        return "\n".join([
            "# HELP total number of accounts",
            "# TYPE accounts gauge",
            f"accounts {self.num_all_logins}",
            "# HELP number of CI accounts",
            "# TYPE ci_accounts gauge",
            f"ci_accounts {self.num_ci_logins}",
            "# HELP number of non-CI accounts",
            "# TYPE nonci_accounts gauge",
            f"nonci_accounts {self.num_user_logins}",
        ]) + "\n"


def textfile_path(path):
    """A directory means fsreport.prom inside it (node_exporter's textfile directory)."""
    if os.path.isdir(path):
        return os.path.join(path, TEXTFILE_NAME)
    return path


def write_text_atomic(path, text):
    # Readable by node_exporter or the web server; replaced whole so a scrape never
    # sees half a file.
    write_atomic(path, text.encode("utf-8"), mode=0o644)


def parse_args(argv):
    parser = ArgumentParser(
        prog="chatmail-fsreport",
        description="Report the storage used by all mailboxes and messages, and logins.",
    )
    add_ini_and_days_arguments(parser)
    parser.add_argument(
        "--min-login-age", type=int, default=0, metavar="DAYS", dest="min_login_age",
        help="sum up message sizes only of addresses whose last login is at least DAYS old",
    )
    parser.add_argument(
        "--mdir", choices=("cur", "new", "tmp"),
        help="sum up message sizes only of this maildir subdirectory",
    )
    parser.add_argument(
        "--maxnum", type=int, default=None,
        help="look at no more than MAXNUM mailboxes",
    )
    parser.add_argument(
        "--textfile", metavar="PATH",
        help=f"write Prometheus metrics to PATH instead of the summary "
        f"(a directory: {TEXTFILE_NAME} inside it)",
    )
    parser.add_argument(
        "--legacy-metrics", metavar="FILE", nargs="?", const=LEGACY_METRICS_PATH,
        help=f"also write upstream's old metrics format to FILE "
        f"(default: {LEGACY_METRICS_PATH})",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = read_config(args.chatmail_ini)
    except ConfigError as exc:
        print(f"chatmail-fsreport: {exc}", file=sys.stderr)
        return 1
    report = Report(
        now=time.time() - args.days * DAY,
        min_login_age=args.min_login_age,
        mdir=args.mdir,
    )
    for scan in iter_mailboxes(config.mailboxes_dir, maxnum=args.maxnum):
        report.process_mailbox(scan)
    try:
        if args.textfile:
            write_text_atomic(textfile_path(args.textfile), report.prometheus_text())
        if args.legacy_metrics:
            write_text_atomic(args.legacy_metrics, report.legacy_metrics_text())
    except OSError as exc:
        print(f"chatmail-fsreport: cannot write metrics: {exc}", file=sys.stderr)
        return 1
    if not args.textfile and not args.legacy_metrics:
        print("\n".join(report.summary_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
