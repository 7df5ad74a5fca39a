import socket
import socketserver

from chatmaild.dictproxy import DictServer, _Server, tab_escape, tab_unescape


class Echo(DictServer):
    def __init__(self):
        self.stored = []

    def lookup(self, key, user):
        if key == "shared/fail":
            raise RuntimeError("boom")
        return f"{key}|{user}" if key.startswith("shared/") else None

    def iterate(self, path, user):
        return [(path + "a", "1"), (path + "b", "2")]

    def set_value(self, user, key, value):
        self.stored.append((user, key, value))
        return value != "bad"


def test_tab_escaping_roundtrip():
    raw = "pa\tss\nwo\rrd\x01!"
    assert "\t" not in tab_escape(raw) and "\n" not in tab_escape(raw)
    assert tab_unescape(tab_escape(raw)) == raw


def test_protocol_lines():
    server, txns = Echo(), {}
    assert server.handle_line("H3\t2\t0\t\tauth", txns) == ""
    assert server.handle_line("Lshared/x\tuser@x.org", txns) == "Oshared/x|user@x.org\n"
    assert server.handle_line("Lpriv/x", txns) == "N\n"
    assert server.handle_line("Lshared/fail", txns) == "F\n"
    assert server.handle_line("I0\t0\tshared/userdb/", txns) == (
        "Oshared/userdb/a\t1\nOshared/userdb/b\t2\n\n")
    assert server.handle_line("B1\tu@x.org", txns) == ""
    assert server.handle_line("S1\tpriv/k\tv", txns) == ""
    assert server.handle_line("C1", txns) == "O\n"
    assert server.handle_line("B2\tu@x.org", txns) == ""
    assert server.handle_line("S2\tpriv/k\tbad", txns) == ""
    assert server.handle_line("C2", txns) == "F\n"
    assert server.stored == [("u@x.org", "priv/k", "v"), ("u@x.org", "priv/k", "bad")]
    # unknown commands and sets outside a transaction are ignored, never crash
    assert server.handle_line("Zwhat", txns) == ""
    assert server.handle_line("S9\tpriv/k\tv", txns) == ""
    assert server.handle_line("C9", txns) == ""


def test_escaped_fields_are_unescaped():
    server = Echo()
    assert server.handle_line("Lshared/p\x01tw\tu", {}) == "Oshared/p\x01tw|u\n"


def test_transactions_are_per_connection(tmp_path):
    server = Echo()
    path = tmp_path / "dict.socket"
    srv = server.make_server(path)
    import threading
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        a, b = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        a.connect(str(path))
        b.connect(str(path))
        fa, fb = a.makefile("rb"), b.makefile("rb")
        a.sendall(b"B1\ta@x.org\n")
        b.sendall(b"B1\tb@x.org\nS1\tk\tbad\n")
        a.sendall(b"S1\tk\tgood\nC1\n")
        assert fa.readline() == b"O\n"
        b.sendall(b"C1\n")
        assert fb.readline() == b"F\n"
        a.close(), b.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "dict.socket"
    path.write_text("stale")
    srv = Echo().make_server(path)
    try:
        assert path.is_socket()
    finally:
        srv.server_close()


def test_socket_path_appears_only_when_it_accepts(tmp_path, monkeypatch):
    path = tmp_path / "dict.socket"
    bound = []

    def bind_and_look(server):
        socketserver.UnixStreamServer.server_bind(server)
        bound.append(path.exists())

    monkeypatch.setattr(_Server, "server_bind", bind_and_look)
    srv = Echo().make_server(path)
    try:
        assert bound == [False]
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # listening, before serve_forever accepts
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dict.socket"]
    finally:
        srv.server_close()
