"""A real SMTP server standing in for Postfix's reinjection port in filtermail tests."""

import threading

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import free_port


class Recorder:
    """aiosmtpd handler that keeps every message; `reply` sets the answer to DATA."""

    def __init__(self):
        self.messages = []
        self.mail_options = []
        self.reply = "250 OK"
        self.rcpt_reply = None
        self.received = threading.Event()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.reply.startswith("250"):
            self.messages.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
            )
            self.mail_options.append(list(envelope.mail_options))
            self.received.set()
        return self.reply


class SmtpSink:
    def __init__(self):
        self.port = free_port()
        self.recorder = Recorder()
        self.controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port,
                                     enable_SMTPUTF8=True)
        self.controller.start()

    @property
    def messages(self):
        return self.recorder.messages

    def stop(self):
        self.controller.stop()


@pytest.fixture
def smtp_sink():
    sink = SmtpSink()
    yield sink
    sink.stop()
