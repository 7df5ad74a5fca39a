"""The `/new` endpoint: hand out a random address and password for a new account.

Delta Chat fetches `https://<MD>/new` (from a DCACCOUNT: QR code, or the web page's
dclogin QR in self-signed mode) and gets JSON:

    {"email": "<user>@<MD>", "password": "...", "dclogin_url": "dclogin:..."}

`dclogin_url` is only present when the relay uses a self-signed certificate. Nothing is
created here: doveauth creates the account on the first IMAP or SMTP login with these
credentials, so this program needs no access to the mailboxes, only to chatmail.ini.

It runs as a CGI program under Debian's fcgiwrap (nginx: `fastcgi_pass
unix:/run/fcgiwrap.socket`), as upstream's does, rather than as an HTTP service of ours:

* memory: nothing of ours stays resident. fcgiwrap is a small C daemon that Debian starts
  from a socket unit on the first request; a Python process lives only for the ~50 ms of
  a request. A service would keep an interpreter in memory for a request that comes a few
  times a day on most relays.
* moving parts: no unit, port, restart policy or HTTP parsing of ours; fcgiwrap and its
  socket unit are Debian's and maintained there, and nginx's fastcgi configuration for it
  is the same as upstream's (also `/cgi-bin/newemail.py` for old QR codes).
* security: each request gets a fresh process as www-data that can read chatmail.ini and
  nothing of the mail store; a crash or a leak ends with the request. fcgiwrap's default
  single worker serialises requests, so a flood queues instead of forking without bound
  (nginx's limit_req throttles it before that). Clients cannot set CHATMAIL_INI: CGI
  passes request headers only as HTTP_* variables.

The price is the interpreter start per request, irrelevant at this request rate.

CGI interface: REQUEST_METHOD GET or POST (or unset, when an admin runs it by hand);
anything else gets `Status: 405`. The ini comes from $CHATMAIL_INI or
/etc/chatmail/chatmail.ini; if it cannot be used the answer is `Status: 500` with a short
JSON error, and the details go to stderr (with fcgiwrap -f: nginx's error log).
"""

import json
import os
import secrets
import string
import sys
import traceback
from urllib.parse import quote

from .config import DEFAULT_INI_PATH, ConfigError, read_config

USERNAME_ALPHABET = string.ascii_lowercase + string.digits
PASSWORD_ALPHABET = string.ascii_letters + string.digits + string.punctuation
# Longer than doveauth's minimum, so that the rule never rejects what we hand out.
PASSWORD_EXTRA_LENGTH = 3
ALLOWED_METHODS = ("GET", "POST")


def random_string(alphabet, length):
    return "".join(secrets.choice(alphabet) for _ in range(length))


def create_newemail_dict(config):
    """A fresh {"email", "password"} pair that doveauth will accept on first login."""
    user = random_string(USERNAME_ALPHABET, config.username_max_length)
    password = random_string(PASSWORD_ALPHABET, config.password_min_length + PASSWORD_EXTRA_LENGTH)
    return {"email": f"{user}@{config.mail_domain}", "password": password}


def create_dclogin_url(config, email, password):
    """A dclogin: URL that also tells the client to accept the self-signed certificate
    (ic=3). IPv4 relays name their IMAP and SMTP host, as clients cannot find it by DNS.
    """
    hosts = f"&ih={config.ipv4_relay}&sh={config.ipv4_relay}" if config.ipv4_relay else ""
    return (
        f"dclogin:{quote(email, safe='@[]')}?p={quote(password, safe='')}"
        f"&v=1{hosts}&ic=3"
    )


def new_account(config):
    account = create_newemail_dict(config)
    if config.tls_cert_mode == "self":
        account["dclogin_url"] = create_dclogin_url(config, account["email"], account["password"])
    return account


def cgi_response(body, status=None, headers=()):
    """A CGI response: header lines, a blank line, then `body` as JSON."""
    lines = []
    if status:
        lines.append(f"Status: {status}")
    lines.append("Content-Type: application/json")
    # Credentials must not end up in a proxy's or browser's cache.
    lines.append("Cache-Control: no-store")
    lines.extend(headers)
    return ("\n".join(lines) + "\n\n" + json.dumps(body) + "\n").encode("utf-8")


def respond(environ):
    """(exit code, CGI response) for one request described by the CGI `environ`."""
    method = environ.get("REQUEST_METHOD", "GET")
    if method not in ALLOWED_METHODS:
        return 1, cgi_response(
            {"error": "method not allowed"},
            status="405 Method Not Allowed",
            headers=[f"Allow: {', '.join(ALLOWED_METHODS)}"],
        )
    inipath = environ.get("CHATMAIL_INI") or DEFAULT_INI_PATH
    try:
        config = read_config(inipath)
        return 0, cgi_response(new_account(config))
    except ConfigError as exc:
        print(f"newemail: {exc}", file=sys.stderr)
    except Exception:
        traceback.print_exc(file=sys.stderr)
    return 1, cgi_response(
        {"error": "the relay is not configured correctly"},
        status="500 Internal Server Error",
    )


USAGE = """\
usage: chatmail-newemail

A CGI program for the relay's /new endpoint (run by fcgiwrap behind nginx): answers with
JSON credentials for a new address. The account is created by its first login.
Reads CHATMAIL_INI, default /etc/chatmail/chatmail.ini.
"""


def main(argv=None, environ=None):
    """Answer one CGI request. Command line arguments are ignored under CGI: servers may
    pass parts of the query string there."""
    environ = os.environ if environ is None else environ
    if "GATEWAY_INTERFACE" not in environ:
        # Run by hand, not by a web server.
        sys.stdout.write(USAGE)
        return 0 if set(sys.argv[1:] if argv is None else argv) & {"-h", "--help"} else 2
    exit_code, response = respond(environ)
    sys.stdout.buffer.write(response)
    sys.stdout.buffer.flush()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
