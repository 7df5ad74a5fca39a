"""Runs inside a bench container next to an installed relay (bench_footprint.py): the first
use of each of our daemons, so that what a daemon imports only when it first needs it is
measured too. With plain protocol clients (relay_meter.py's):

  doveauth           IMAP logins of two new accounts (creates them: its first write)
  lastlogin          the same logins (records their day)
  chatmail-metadata  SETMETADATA of the recipient's push token (a write), the TURN
                     credentials, and the push for the message below (no network in the
                     container: it fails, after http.client and ssl are imported and the
                     TLS context is made)
  filtermail         one encrypted message submitted on 465 from the other account (a
                     message to oneself is pushed to no one)
  filtermail-incoming  one unsigned message from another domain on port 25 (STARTTLS) (its DKIM
                     check refuses it)

Prints one JSON line: what each step answered.
Usage: footprint_use.py NAME (new accounts NAMEr and NAMEs for each call; doveauth's
default wants 9 characters: NAME has 8)"""

import configparser
import json
import smtplib
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay_meter import CONTEXT, PASSWORD, Imap, Submission, message  # noqa: E402


def main():
    ini = configparser.ConfigParser(interpolation=None)
    ini.read("/etc/chatmail/chatmail.ini")
    domain = ini["params"]["mail_domain"]
    address, sender = (f"{sys.argv[1]}{role}@{domain}" for role in "rs")
    done = {}
    started = time.time()
    Imap(sender).close()
    imap = Imap(address)
    imap.command('SETMETADATA INBOX (/private/devicetoken "footprint-token")')
    imap.command('GETMETADATA "" /shared/vendor/deltachat/turn')
    done["imap"] = "ok"
    smtp = Submission("127.0.0.1", 465, context=CONTEXT, timeout=30)
    smtp.login(sender, PASSWORD)
    smtp.sendmail(sender, [address], message(sender, address, 1))
    smtp.quit()
    done["submission"] = "ok"
    try:
        with smtplib.SMTP("127.0.0.1", 25, local_hostname="client.example", timeout=30) as mx:
            mx.starttls(context=CONTEXT)  # as tests/system/test_install.py's no_dkim
            mx.sendmail("someone@example.org", [address],
                        message("someone@example.org", address, 2))
        done["incoming"] = "accepted"
    except smtplib.SMTPException as refused:
        done["incoming"] = f"refused: {refused}"[:200]
    time.sleep(3)  # delivered and pushed meanwhile
    imap.close()
    # The push was tried: with no network it fails, and the daemon says so.
    journal = subprocess.run(["journalctl", "-q", "-o", "cat", "-u", "chatmail-metadata",
                              "--since", f"@{int(started)}"], capture_output=True, text=True)
    done["push_tried"] = journal.stdout.count("Notification request failed")
    print(json.dumps(done))


if __name__ == "__main__":
    main()
