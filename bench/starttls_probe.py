#!/usr/bin/python3
"""An SMTP client that writes as Postfix's smtp client does (no TCP_NODELAY): after
STARTTLS the TLS handshake, whose last client write is its Finished, then the EHLO as a
second small write. Prints per connection whether the TLS session was resumed (the
previous connection's session offered, with `reuse`), the handshake's time and how long
the EHLO's reply took; on an implicit-TLS port (465, 2465) how long the greeting took
after the handshake. About 40 ms there means a write waited for a delayed ACK (Nagle):
results/delivery-analysis.md. Certificates are not checked.

    /usr/bin/python3 bench/starttls_probe.py HOST PORT CONNECTIONS reuse|noreuse
"""

import socket
import ssl
import sys
import time

IMPLICIT_TLS = (465, 2465)


def reply(sock):
    """One whole SMTP reply (multi-line ones too)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError(data)
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data


def connection(host, port, context, session):
    raw = socket.create_connection((host, port))
    if port not in IMPLICIT_TLS:
        reply(raw)
        raw.sendall(b"EHLO probe.test\r\n")
        reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        reply(raw)
    started = time.monotonic()
    tls = context.wrap_socket(raw, server_hostname=host, session=session)
    handshake = time.monotonic()
    if port not in IMPLICIT_TLS:
        tls.sendall(b"EHLO probe.test\r\n")
    reply(tls)
    answered = time.monotonic()
    tls.sendall(b"QUIT\r\n")
    row = (tls.session_reused, tls.version(), (handshake - started) * 1000,
           (answered - handshake) * 1000, tls.session)
    tls.close()
    return row


def main():
    host, port, count, reuse = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    what = "greeting" if port in IMPLICIT_TLS else "EHLO reply"
    session = None
    for _ in range(count):
        reused, version, handshake, answer, last = connection(host, port, context, session)
        if reuse == "reuse":
            session = last
        print(f"port {port} reused={reused!s:5} {version} handshake {handshake:6.1f} ms  "
              f"{what} {answer:6.1f} ms", flush=True)
        time.sleep(0.2)


if __name__ == "__main__":
    main()
