"""chatmaild.openrc: the wait of the filters' OpenRC scripts (start_post) until filtermail
greets SMTP clients on the port chatmail.ini gives it."""

import socket

from chatmaild import openrc
from tests.conftest import free_port

from .smtpsink import smtp_sink  # noqa: F401  (fixture)


def test_returns_once_the_filter_greets(make_ini, smtp_sink):
    """An SMTP server on the filter's port stands in for filtermail."""
    ini = make_ini(filtermail_smtp_port_incoming=smtp_sink.port)
    assert openrc.main(["wait-for-filter", str(ini), "incoming", "--seconds", "5"]) == 0


def test_says_where_nothing_answers(make_ini, capsys):
    port = free_port()
    ini = make_ini(filtermail_smtp_port=port)
    assert openrc.main(["wait-for-filter", str(ini), "outgoing", "--seconds", "0.3"]) == 1
    assert f"does not answer on 127.0.0.1:{port} after 0.3 s" in capsys.readouterr().err


def test_a_listener_that_does_not_speak_smtp_is_not_the_filter(make_ini):
    """Listening is not enough (another program may hold the port): the 220 greeting."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        ini = make_ini(filtermail_smtp_port=silent.getsockname()[1])
        assert openrc.wait_for_filter(ini, "outgoing", seconds=0.3) == 1


def test_unreadable_configuration(tmp_path, capsys):
    ini = tmp_path / "chatmail.ini"
    ini.write_text("[params]\n")
    assert openrc.wait_for_filter(ini, "outgoing", seconds=0) == 1
    assert "filtermail: error:" in capsys.readouterr().err
