"""Runs inside a bench container with Debian's python3 (check_imaplogin_memory.py): how
much memory the system OpenSSL keeps per server-side TLS 1.3 connection after the
handshake, with no Dovecot around it. COUNT server and client objects handshake over
memory BIOs in this process (one record each way after the handshake); the clients are
dropped, the servers kept; the cost is the growth of malloc's bytes in use (mallinfo2)
divided by COUNT. Python's ssl module, like Dovecot, sets SSL_MODE_RELEASE_BUFFERS.
Variants: the client's groups as the system's default (OpenSSL 3.5: X25519MLKEM768
hybrid first), the client offering X25519 only, the server accepting X25519 only.
Prints one JSON object: {variant: {"kb": ..., "group": ...}}.
Usage: tls_object_meter.py CERT KEY [COUNT]"""

import ctypes
import gc
import json
import ssl
import sys

LIBC = ctypes.CDLL("libc.so.6")


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                "keepcost".split()]


LIBC.mallinfo2.restype = Mallinfo2


def in_use():
    info = LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def contexts(cert, key, client_groups=None, server_groups=None):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    if client_groups:
        client.set_ecdh_curve(client_groups)
    if server_groups:
        server.set_ecdh_curve(server_groups)
    return server, client


def connection(server_context, client_context):
    """A server object after a full handshake and one record each way (and its BIOs)."""
    to_server, from_server, to_client, from_client = (ssl.MemoryBIO() for _ in range(4))
    server = server_context.wrap_bio(to_server, from_server, server_side=True)
    client = client_context.wrap_bio(to_client, from_client)
    for _ in range(10):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        if from_client.pending:
            to_server.write(from_client.read())
        if from_server.pending:
            to_client.write(from_server.read())
    client.write(b"a")
    to_server.write(from_client.read())
    server.read(1)
    server.write(b"b")
    to_client.write(from_server.read())
    client.read(1)
    group = getattr(server, "group", None)  # Python 3.15 and later
    return (server, to_server, from_server), group() if callable(group) else None


def per_connection(server_context, client_context, count):
    connection(server_context, client_context)
    gc.collect()
    before = in_use()
    kept = [connection(server_context, client_context) for _ in range(count)]
    gc.collect()
    return (in_use() - before) / count / 1024, kept[0][1]


def main():
    cert, key = sys.argv[1:3]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    variants = {"client default groups": {}}
    try:
        contexts(cert, key, client_groups="X25519")
        variants["client X25519 only"] = {"client_groups": "X25519"}
        variants["server X25519 only"] = {"server_groups": "X25519"}
    except ssl.SSLError:
        pass  # Python before 3.13 sets only NIST curves this way (X25519 is 3.0's default)
    found = {"openssl": ssl.OPENSSL_VERSION}
    for label, groups in variants.items():
        kb, group = per_connection(*contexts(cert, key, **groups), count)
        found[label] = {"kb": round(kb, 1), "group": group}
    print(json.dumps(found))


if __name__ == "__main__":
    main()
