"""DKIM keys for tests: RSA keys made with the openssl command, published through an
injected lookup function instead of DNS."""

import base64
import subprocess

SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


def generate_rsa_key(bits=2048):
    """(PKCS#1 PEM private key, DNS TXT record) made with the openssl command."""
    private = subprocess.run(["openssl", "genrsa", "-traditional", str(bits)],
                             check=True, capture_output=True, timeout=60).stdout
    public_der = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"],
                                input=private, check=True, capture_output=True,
                                timeout=60).stdout
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)


class KeyDirectory:
    """An injected DNS: a dict of TXT records, counting lookups."""

    def __init__(self):
        self.records = {}
        self.lookups = []

    def publish(self, selector, domain, record):
        self.records[f"{selector}._domainkey.{domain}.".lower()] = record

    def __call__(self, name, timeout=5):
        self.lookups.append(name)
        value = self.records.get(name.decode().lower())
        if isinstance(value, Exception):
            raise value
        return value
