#!/usr/bin/env python3
"""What key exchange groups a TLS client offers: a TLS server on 127.0.0.1 (this Python's
ssl, a throwaway self-signed certificate) that records each ClientHello's supported_groups
and key_share extensions. Clients: this Python's own ssl module (as bench/capacity_meter.py
connects), and with --deltachat VENV, Delta Chat's core (deltachat-rpc-server from the
virtualenv that tests/system/container.py's deltachat_venv() makes) configuring an account
whose IMAP and SMTP are this server (its login fails; the hello is what counts).
Run it with the Python whose client is asked about, e.g. the virtualenv's python for both.
Usage: check_client_hello.py [--deltachat VENV]. Prints JSON lines: client, hello."""

import argparse
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

NAMES = {0x001d: "X25519", 0x001e: "X448", 0x0017: "secp256r1", 0x0018: "secp384r1",
         0x0019: "secp521r1", 0x0100: "ffdhe2048", 0x0101: "ffdhe3072",
         0x0102: "ffdhe4096", 0x0103: "ffdhe6144", 0x0104: "ffdhe8192",
         0x11ec: "X25519MLKEM768", 0x11eb: "SecP256r1MLKEM768",
         0x11ed: "SecP384r1MLKEM1024", 0x6399: "X25519Kyber768Draft00"}


def group(number):
    return NAMES.get(number, hex(number))


def parse_client_hello(data):
    """supported_groups and key_share (group and key length) of a ClientHello message."""
    pos = 4 + 2 + 32  # header, legacy version, random
    pos += 1 + data[pos]  # session id
    pos += 2 + struct.unpack(">H", data[pos:pos + 2])[0]  # cipher suites
    pos += 1 + data[pos]  # compression methods
    end = pos + 2 + struct.unpack(">H", data[pos:pos + 2])[0]
    pos += 2
    found = {}
    while pos < end:
        kind, length = struct.unpack(">HH", data[pos:pos + 4])
        body = data[pos + 4:pos + 4 + length]
        pos += 4 + length
        if kind == 10:
            found["supported_groups"] = [group(g) for g in
                                         struct.unpack(f">{(length - 2) // 2}H", body[2:])]
        elif kind == 51:
            at, shares = 2, []
            while at < len(body):
                number, size = struct.unpack(">HH", body[at:at + 4])
                shares.append(f"{group(number)} ({size} bytes)")
                at += 4 + size
            found["key_shares"] = shares
    return found


def server(hellos):
    workdir = tempfile.mkdtemp()
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=probe"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def record(conn, direction, version, content_type, msg_type, data):
        if (direction == "read" and content_type == ssl._TLSContentType.HANDSHAKE
                and msg_type == ssl._TLSMessageType.CLIENT_HELLO):
            hellos.append(parse_client_hello(data))

    context._msg_callback = record  # CPython's hook for raw handshake messages
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            conn, _ = listener.accept()
            try:
                tls = context.wrap_socket(conn, server_side=True)
                tls.sendall(b"* BYE probe\r\n")
                tls.close()
            except (OSError, ssl.SSLError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def python_client(port):
    context = ssl.create_default_context()  # as capacity_meter.py and relay_meter.py
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port))) as tls:
        tls.recv(100)


def deltachat_client(port):
    from deltachat_rpc_client import DeltaChat, Rpc
    import deltachat_rpc_server

    binary = os.path.join(os.path.dirname(deltachat_rpc_server.__file__),
                          "deltachat-rpc-server")
    with Rpc(accounts_dir=tempfile.mkdtemp(), rpc_server_path=binary) as rpc:
        account = DeltaChat(rpc).add_account()
        try:
            account.add_transport_from_qr(
                f"dclogin:probe@example.org?p=probe-password-1&v=1&ih=127.0.0.1&ip={port}"
                f"&is=ssl&sh=127.0.0.1&sp={port}&ss=ssl&ic=3")
        except Exception:  # noqa: BLE001 - the probe speaks no IMAP
            pass
    from importlib.metadata import version

    return version("deltachat-rpc-server")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deltachat", metavar="VENV")
    options = parser.parse_args()
    hellos = []
    port = server(hellos)
    python_client(port)
    time.sleep(0.5)
    print(json.dumps({"client": f"Python {sys.version.split()[0]} ssl, {ssl.OPENSSL_VERSION}",
                      "hello": hellos[0]}))
    if options.deltachat:
        del hellos[:]
        version = deltachat_client(port)
        for hello in hellos:
            print(json.dumps({"client": f"deltachat-rpc-server {version}", "hello": hello}))


if __name__ == "__main__":
    main()
