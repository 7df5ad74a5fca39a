"""Delta Chat A→B latency, the client side: runs inside a test container with the Delta
Chat virtualenv's python, appended to tests/system/deltachat_pair.py (which gives dclogin,
open_rpc and the argv: DOMAIN, VENV, ARGS). ARGS[0] is a JSON list of pairs, each
{"sender": [domain, host], "receiver": [domain, host]}. Reads one JSON command a line on
stdin and answers one JSON line on stdout (the host alternates between pairs and relays):

    {"do": "setup"}                       accounts created, each pair verified, senders bots
    {"do": "sample", "pair": 0, "n": 7}   one message of the pair's sender to its receiver
    {"do": "quit"}

Why bots: the core paces a normal account's sends (a burst of 3, then one a second) and
a bot's not at all (src/smtp/send.rs: `send()` counts a message for the limiter only if
Config::Bot is unset); the senders are bots so that a sample never waits for the limiter.
Every event is stamped with the wall clock when the client library receives it, so the
host can put the core's log lines next to the relays' journal (same kernel clock)."""

import json
import queue
import sys
import time


class StampedQueue(queue.Queue):
    """An account's event queue that also keeps (arrival time, event) for the host."""

    def __init__(self):
        super().__init__()
        self.log = []

    def put(self, item, *args, **kwargs):
        self.log.append((time.time(), item))
        super().put(item, *args, **kwargs)


def stamp_events(rpc):
    """Replace the client library's per-account queues by stamped ones (Rpc.get_queue
    creates them on first use; the events thread calls it for every event)."""
    def get_queue(account_id):
        if account_id not in rpc.event_queues:
            rpc.event_queues[account_id] = StampedQueue()
        return rpc.event_queues[account_id]
    rpc.get_queue = get_queue


def login(dc, domain, host, user):
    account = dc.add_account()
    account.add_transport_from_qr(dclogin(domain, user, f"{user}-password", host))  # noqa: F821
    account.bring_online()
    return account


def setup_pair(dc, index, pair):
    """A sender (a bot) and a receiver (a normal account), verified with each other.
    Names of 9 characters: the relay's username_max_length."""
    suffix = f"{index}{int(time.time()) % 100000:05d}"
    sender = login(dc, *pair["sender"], f"snd{suffix}")
    receiver = login(dc, *pair["receiver"], f"rcv{suffix}")
    sender.set_config("bot", "1")
    receiver.secure_join(sender.get_qr_code())
    sender.wait_for_securejoin_inviter_success()
    receiver.wait_for_securejoin_joiner_success()
    return sender, receiver, sender.create_chat(receiver)


def events_since(account, start):
    """(seconds after start, kind, text) of the account's events since start."""
    return [(round(t - start, 6), e.get("kind"), e.get("msg", ""))
            for t, e in account._rpc.get_queue(account.id).log if t >= start]


def sample(pairs, index, number):
    sender, receiver, chat = pairs[index]
    text = f"latency {index} {number}"
    for account in (sender, receiver):
        account.clear_all_events()
        account._rpc.get_queue(account.id).log.clear()
    start = time.time()
    chat.send_text(text)
    sent = time.time()
    while True:
        event = receiver.wait_for_event(EventType.INCOMING_MSG)  # noqa: F821
        if receiver.get_message_by_id(event.msg_id).get_snapshot().text == text:
            break
    arrival = next(t for t, e in reversed(receiver._rpc.get_queue(receiver.id).log)
                   if e.get("kind") == "IncomingMsg" and e.get("msgId") == event.msg_id)
    return {"start": start, "send_call": sent - start, "incoming": arrival - start,
            "sender_events": events_since(sender, start),
            "receiver_events": events_since(receiver, start)}


def serve(pairs_spec):
    with open_rpc(VENV, WORKDIR + "/accounts") as rpc:  # noqa: F821
        stamp_events(rpc)
        dc = DeltaChat(rpc)  # noqa: F821
        pairs = []
        for line in sys.stdin:
            command = json.loads(line)
            if command["do"] == "quit":
                break
            if command["do"] == "setup":
                pairs = [setup_pair(dc, i, p) for i, p in enumerate(pairs_spec)]
                reply = {"version": dc.get_system_info().deltachat_core_version}
            else:
                reply = sample(pairs, command["pair"], command["n"])
            print(json.dumps(reply), flush=True)


serve(json.loads(ARGS[0]))  # noqa: F821
