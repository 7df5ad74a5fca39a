"""DKIM keys for tests: RSA keys made with the openssl command, published through an
injected lookup function instead of DNS."""

import base64
import subprocess

import dkim

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
        """dkimpy's blocking dnsfunc."""
        self.lookups.append(name)
        text = name.decode() if isinstance(name, bytes) else name
        value = self.records.get(text.lower())
        if isinstance(value, Exception):
            raise value
        return value

    async def lookup(self, name):
        """The asynchronous lookup filtermail's incoming filter awaits."""
        return self(name)


def zone_txt(record):
    """`record` as a zone file's TXT value: strings of at most 255 characters."""
    text = record.decode() if isinstance(record, bytes) else record
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


def dkim_signed(mail, key, selectors=("sel",)):
    """`mail` with DKIM signatures of its From domain made with `key`, one per selector."""
    from_line = next(line for line in mail.split(b"\r\n") if line.lower().startswith(b"from:"))
    domain = from_line.rpartition(b"@")[2].strip(b"> ")
    for selector in selectors:
        mail = dkim.sign(mail, selector.encode(), domain, key[0],
                         include_headers=SIGNED_HEADERS) + mail
    return mail
