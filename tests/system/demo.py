#!/usr/bin/env python3
"""`make demo`: a chatmail relay in a throw-away container on this machine's network, and
an invite link (with a QR code) that Delta Chat opens to create an account on it.

The relay is an IPv4 relay (addresses like NAME@[192.0.2.1]) with a self-signed
certificate, so it needs no DNS. Ports 25, 80, 143, 443, 465, 587 and 993 of this machine
must be free. Ctrl-C stops and removes the container.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.system.container import Container, build_rootfs  # noqa: E402
from tests.system.test_install import install_script  # noqa: E402

NEW_ACCOUNT = ("GATEWAY_INTERFACE=CGI/1.1 REQUEST_METHOD=POST "
               "/usr/libexec/chatmail/chatmail-newemail | sed '1,/^\\r\\?$/d'")


def host_address():
    """The address other devices reach this machine at (the default route's source)."""
    out = subprocess.run(["ip", "-4", "route", "get", "192.0.2.1"], capture_output=True,
                         text=True).stdout.split()
    return out[out.index("src") + 1] if "src" in out else "127.0.0.1"


def print_invite(link):
    print(f"\nOpen this link in Delta Chat (or scan the code) to get an account:\n\n{link}\n")
    try:
        import qrcode

        code = qrcode.QRCode(border=1)
        code.add_data(link)
        code.print_ascii(invert=True)
    except ImportError:
        print("(install python3-qrcode to see a QR code here)")


def main():
    address = sys.argv[1] if len(sys.argv) > 1 else host_address()
    box = Container(f"demo-{os.getpid()}", build_rootfs(),
                    tempfile.mkdtemp(prefix="chatmail-demo-", dir="/var/tmp"),
                    private_network=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        print("demo: booting a fresh Debian 12 container", flush=True)
        box.boot()
        print(f"demo: installing chatmail-relay for {address}", flush=True)
        box.run(install_script(address), timeout=900)
        credentials = json.loads(box.run(NEW_ACCOUNT).stdout)
        print_invite(credentials["dclogin_url"])
        print("\nThe relay runs until you press Ctrl-C.", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        print("\ndemo: stopping and removing the container", flush=True)
        box.stop()


if __name__ == "__main__":
    main()
