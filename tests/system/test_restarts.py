"""A filter restarted while mail flows (an upgrade, `chatmail configure` after an edit):
systemd holds the filter's socket (socket activation), so no client sees a 4xx, and
every message Postfix accepted is delivered. Mail goes in every 50 ms through submission
(587, the outgoing filter) and port 25 (the incoming filter) while `systemctl restart`
or a reinstall of our packages (what an upgrade runs) takes its time."""

import json

import pytest

from tests.unit.mailfactory import armor, encrypted_mail

from .conftest import installed_relays
from .test_install import DOMAIN

SENDER, RECIPIENT = f"restart01@{DOMAIN}", f"restart02@{DOMAIN}"
PASSWORD = "correct-horse-battery"
MESSAGE = "/root/message.eml"
# An OpenPGP packet sequence (a public-key encrypted session key, then encrypted data):
# what the filters take for an encrypted message.
PACKETS = bytes([0xC1, 12]) + bytes(12) + bytes([0xD2, 40, 1]) + bytes(39)

# Sends the message in file MESSAGE every 50 ms for SECONDS through PORT (logged in on
# 587), runs COMMAND after a second; prints what the client saw and how long COMMAND took.
STEADY_SENDER = r'''
import json, smtplib, ssl, subprocess, sys, threading, time
port, sender, recipient, password, message, seconds, command = sys.argv[1:8]
seconds, interval = float(seconds), 0.05
message = open(message, "rb").read()
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
seen = {"accepted": 0, "temporary": [], "permanent": [], "broken": []}

def connect():
    smtp = smtplib.SMTP("127.0.0.1", int(port), timeout=120)
    smtp.starttls(context=context)
    if port == "587":
        smtp.login(sender, password)
    return smtp

def run_command():
    time.sleep(1)
    started = time.monotonic()
    subprocess.run(command, shell=True, check=True, stdout=subprocess.DEVNULL)
    seen["command_seconds"] = round(time.monotonic() - started, 2)

def refusal(exc):
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return next(iter(exc.recipients.values()))
    return exc.smtp_code, exc.smtp_error

runner = threading.Thread(target=run_command)
runner.start()
smtp = connect()
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        smtp.sendmail(sender, [recipient], message)
        seen["accepted"] += 1
    except (smtplib.SMTPRecipientsRefused, smtplib.SMTPResponseException) as exc:
        code, text = refusal(exc)
        kind = "temporary" if 400 <= code < 500 else "permanent"
        seen[kind].append(f"{code} {text.decode(errors='replace')}")
        smtp.rset()
    except (OSError, smtplib.SMTPException) as exc:
        seen["broken"].append(repr(exc))
        smtp = connect()
    time.sleep(interval)
smtp.quit()
runner.join()
print(json.dumps(seen))
'''


LOGIN = """
import imaplib, ssl
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=context).login("{address}", "{password}")
"""


def delivered(box, address):
    maildir = f"/home/vmail/mail/{DOMAIN}/{address}"
    out = box.run(f"find {maildir}/new {maildir}/cur -type f 2>/dev/null | wc -l",
                  check=False).stdout
    return int(out.strip() or 0)


def allow_steady_mail(box):
    """What the test's steady sender needs of a freshly installed relay."""
    # One user sends all the test's mail: no rate limit. Mail arriving on port 25 needs
    # its sender domain's DKIM signature, and the test network has no DNS for it.
    box.run("chatmail set max_user_send_per_minute=100000 "
            "max_user_send_burst_size=100000 && chatmail configure >/dev/null")
    box.run("mkdir -p /etc/systemd/system/filtermail-incoming.service.d && "
            "printf '[Service]\\nEnvironment=FILTERMAIL_SKIP_DKIM=1\\n' "
            ">/etc/systemd/system/filtermail-incoming.service.d/test.conf && "
            "systemctl daemon-reload && systemctl restart filtermail-incoming")
    # The recipient's first login creates its mailbox.
    box.python(LOGIN.format(address=RECIPIENT, password=PASSWORD))
    message = encrypted_mail(SENDER, RECIPIENT, armor(PACKETS))
    box.run(f"cat > {MESSAGE}", input=message.decode())
    box.run("cat > /root/steady_sender.py", input=STEADY_SENDER)


@pytest.fixture(scope="module")
def relays_by_suite(request):
    """conftest's relays, ready for the steady sender."""
    with installed_relays(request, "restarts", prepare=allow_steady_mail) as relays:
        yield relays


def send_while(box, port, command, seconds=6, background=None):
    """What a client sending every 50 ms through PORT saw while COMMAND ran; with
    `background` (a file), it sends in the background and reports there."""
    script = (f"python3 /root/steady_sender.py {port} {SENDER} {RECIPIENT} {PASSWORD} "
              f"{MESSAGE} {seconds} '{command}'")
    if background:
        box.run(f"nohup {script} >{background} 2>&1 &")
        return None
    return last_json(box.run(script, timeout=300).stdout)


def last_json(output):
    return json.loads(output.strip().splitlines()[-1])


def wait_for_delivery(box, address, count, timeout=120):
    box.run(f"for i in $(seq {timeout}); do "
            f"[ $(find /home/vmail/mail/{DOMAIN}/{address}/new "
            f"/home/vmail/mail/{DOMAIN}/{address}/cur -type f | wc -l) -ge {count} ] "
            "&& exit 0; sleep 1; done; exit 1", check=False, timeout=timeout + 30)
    return delivered(box, address)


def assert_nothing_refused(seen):
    assert seen["temporary"] == [] and seen["permanent"] == [] and seen["broken"] == [], seen
    assert seen["accepted"] > 50, seen


@pytest.mark.parametrize("port, unit", [(587, "filtermail"), (25, "filtermail-incoming")])
def test_no_4xx_across_a_restart_and_all_mail_delivered(relay, port, unit):
    before = delivered(relay, RECIPIENT)
    seen = send_while(relay, port, f"systemctl restart {unit}")
    print(f"{unit}: {json.dumps(seen)}")  # the numbers, with pytest -s
    assert_nothing_refused(seen)
    expected = before + seen["accepted"]
    assert wait_for_delivery(relay, RECIPIENT, expected) == expected
    assert relay.run(f"systemctl is-active {unit}.socket {unit}").stdout.split() \
        == ["active", "active"]


def test_no_4xx_while_an_upgrade_restarts_both_filters(relay):
    """A reinstall runs what an upgrade runs: the maintainer scripts (debhelper's preinst
    leaves the filters running) and `chatmail configure --reload` for every service."""
    before = delivered(relay, RECIPIENT)
    send_while(relay, 25, "true", seconds=15, background="/root/incoming.out")
    outgoing = send_while(relay, 587, "apt-get install -y --reinstall python3-chatmaild "
                          "chatmail-relay", seconds=15)
    relay.run("until grep -q accepted /root/incoming.out; do sleep 1; done", timeout=120)
    incoming = last_json(relay.run("cat /root/incoming.out").stdout)
    print(f"upgrade: {json.dumps(outgoing)} {json.dumps(incoming)}")
    assert_nothing_refused(outgoing)
    assert_nothing_refused(incoming)
    # Mail that met doveauth stopped for the upgrade (Dovecot's userdb) waits in the queue.
    relay.run("postqueue -f")
    expected = before + outgoing["accepted"] + incoming["accepted"]
    assert wait_for_delivery(relay, RECIPIENT, expected) == expected
