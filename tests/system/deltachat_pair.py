"""Runs inside a test container with the Delta Chat virtualenv's packages on the path (not
imported by pytest): the start of every client script. Two accounts on the relay, created
by their first login through dclogin links, verified with each other by SecureJoin."""

import os
import sys
import tempfile

from deltachat_rpc_client import DeltaChat, EventType, Rpc  # noqa: F401 (for the scripts)


def dclogin(domain, user, password, host="127.0.0.1"):
    """ic=3: any certificate (the core trusts its own roots only, not the system's)."""
    return f"dclogin:{user}@{domain}?p={password}&v=1&ih={host}&sh={host}&ic=3"


def verified_pair(rpc, domain, bob_domain=None, host="127.0.0.1"):
    """(alice, bob), online and verified with each other; bob on `bob_domain` if given
    (then both log in to their domain's name, `host` otherwise)."""
    dc = DeltaChat(rpc)
    alice, bob = dc.add_account(), dc.add_account()
    alice_host, bob_host = (domain, bob_domain) if bob_domain else (host, host)
    alice.add_transport_from_qr(dclogin(domain, "alice0001", "alice-password-1", alice_host))
    bob.add_transport_from_qr(dclogin(bob_domain or domain, "bobby0002", "bob-password-22",
                                      bob_host))
    alice.bring_online()
    bob.bring_online()
    bob.secure_join(alice.get_qr_code())
    alice.wait_for_securejoin_inviter_success()
    bob.wait_for_securejoin_joiner_success()
    return alice, bob


def open_rpc(venv, tmp):
    # The static binary itself: the venv's bin/ wrapper needs the venv's own Python.
    import deltachat_rpc_server

    server = os.path.join(os.path.dirname(deltachat_rpc_server.__file__), "deltachat-rpc-server")
    return Rpc(accounts_dir=tmp, rpc_server_path=server)


DOMAIN, VENV, ARGS = sys.argv[1], sys.argv[2], sys.argv[3:]
WORKDIR = tempfile.mkdtemp()
