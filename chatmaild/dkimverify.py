"""Incoming DKIM verification with strict alignment, as upstream's filtermail does it.

A message passes when at least one DKIM-Signature verifies and its d= equals the domain of
the From address (case-insensitive): DMARC's strict alignment (adkim=s), without looking
at DMARC policy records, SPF or the client's IP address. Mail from an IP-literal domain
(`user@[192.0.2.1]`, sent by IP-only relays, which cannot publish DKIM keys) is not
checked.

dkimpy and dnspython are imported here only, so the outgoing filter never loads them.
"""

import collections
import logging
import threading
import time

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

log = logging.getLogger(__name__)

NO_SIGNATURE = "554 5.7.1 No DKIM signature found"
NO_VALID_SIGNATURE = "554 5.7.1 No valid DKIM signature found"
# Not upstream's: a key that could not be looked up is a reason to try again later, not to
# bounce the mail.
DNS_TEMPORARY_FAILURE = "451 4.4.3 Temporary DNS failure while verifying DKIM signature"

DNS_TIMEOUT = 20.0
# Each verification hashes the whole body again; a flood of signatures must not turn one
# message into minutes of work. Legitimate mail has one aligned signature, rarely two.
MAX_ALIGNED_SIGNATURES = 5
CACHE_SIZE = 1000
MAX_CACHE_TTL = 3600
NEGATIVE_CACHE_TTL = 300


class DnsTemporaryError(Exception):
    """The key record could not be looked up now; a later attempt may succeed."""


def is_ip_literal(domain):
    return domain.startswith("[") and domain.endswith("]")


def comparable_domain(domain):
    """Lower-case ASCII form: d= is written in A-labels (xn--...), while the From of
    internationalized mail (RFC 6532) may carry the Unicode form of the same domain."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


class TxtLookup:
    """DNS TXT lookups for dkimpy (its `dnsfunc`), with a small TTL-bounded LRU cache.

    Returns the record as bytes, None if the name or record does not exist, and raises
    DnsTemporaryError on timeouts and server failures (those are not cached).
    `nameservers`/`port` replace /etc/resolv.conf, for tests.
    """

    def __init__(self, timeout=DNS_TIMEOUT, nameservers=None, port=53,
                 cache_size=CACHE_SIZE, clock=time.monotonic):
        self.timeout = timeout
        self.nameservers = nameservers
        self.port = port
        self.cache_size = cache_size
        self.clock = clock
        self.queries = 0
        self._cache = collections.OrderedDict()
        self._lock = threading.Lock()
        self._resolver = None

    def __call__(self, name, timeout=None):
        try:
            qname = name.decode("ascii") if isinstance(name, bytes) else str(name)
        except UnicodeDecodeError:
            return None
        qname = qname.lower()
        found, value = self._cached(qname)
        if found:
            return value
        value, ttl = self._query(qname, min(timeout or self.timeout, self.timeout))
        self._remember(qname, value, ttl)
        return value

    def _cached(self, qname):
        with self._lock:
            entry = self._cache.get(qname)
            if entry is None:
                return False, None
            expires, value = entry
            if expires <= self.clock():
                del self._cache[qname]
                return False, None
            self._cache.move_to_end(qname)
            return True, value

    def _remember(self, qname, value, ttl):
        with self._lock:
            self._cache[qname] = (self.clock() + ttl, value)
            self._cache.move_to_end(qname)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _get_resolver(self):
        import dns.resolver

        if self._resolver is None:
            if self.nameservers is None:
                resolver = dns.resolver.Resolver()  # reads /etc/resolv.conf
            else:
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = list(self.nameservers)
                resolver.port = self.port
            self._resolver = resolver
        return self._resolver

    def _query(self, qname, timeout):
        """(record or None, seconds to cache it)."""
        import dns.exception
        import dns.resolver

        self.queries += 1
        try:
            answer = self._get_resolver().resolve(
                qname, "TXT", lifetime=timeout, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None, NEGATIVE_CACHE_TTL
        except (dns.resolver.NoNameservers, dns.resolver.NoResolverConfiguration,
                dns.exception.Timeout) as exc:
            raise DnsTemporaryError(f"{qname}: {exc}") from None
        except dns.exception.DNSException as exc:
            # Names that cannot be queried at all (label too long, ...) never will be.
            log.info("DKIM key lookup of %s failed: %s", qname, exc)
            return None, NEGATIVE_CACHE_TTL
        records = [b"".join(rdata.strings) for rdata in answer]
        # A name may hold other TXT records too; the key record is the one with p=.
        keys = [record for record in records if b"p=" in record]
        value = (keys or records or [None])[0]
        return value, max(0, min(answer.rrset.ttl, MAX_CACHE_TTL))


def signature_domains(verifier):
    """The d= value (lower-case str, or None if unparsable) of each DKIM-Signature."""
    domains = []
    for name, value in verifier.headers:
        if name.lower() != b"dkim-signature":
            continue
        try:
            domain = parse_tag_value(value).get(b"d")
        except (InvalidTagValueList, ValueError):
            domain = None
        try:
            domains.append(domain.strip().decode("ascii").lower() if domain else None)
        except UnicodeDecodeError:
            domains.append(None)
    return domains


def check_dkim(content, from_domain, dnsfunc):
    """None if `content` carries a valid DKIM signature aligned with `from_domain`,
    else the SMTP reply to refuse it with.

    `from_domain` is the domain of the From address, or None when the From header has no
    single usable address (then no signature can be aligned).
    """
    if from_domain and is_ip_literal(from_domain):
        return None
    try:
        verifier = dkim.DKIM(content, timeout=DNS_TIMEOUT)
        domains = signature_domains(verifier)
    except Exception as exc:  # dkimpy's parser on hostile input
        log.info("DKIM: cannot parse message: %s", exc)
        return NO_VALID_SIGNATURE
    if not domains:
        return NO_SIGNATURE
    wanted = comparable_domain(from_domain) if from_domain else None
    aligned = [
        index for index, domain in enumerate(domains)
        if wanted is not None and domain is not None and comparable_domain(domain) == wanted
    ]
    temporary_failure = False
    for index in aligned[:MAX_ALIGNED_SIGNATURES]:
        domain = domains[index]
        try:
            if verifier.verify(idx=index, dnsfunc=dnsfunc):
                return None
        except DnsTemporaryError as exc:
            log.warning("DKIM key lookup failed temporarily: %s", exc)
            temporary_failure = True
        except dkim.DKIMException as exc:
            log.info("DKIM signature %d of %s invalid: %s", index, domain, exc)
        except Exception:
            # dkimpy has a history of letting odd input escape as other exceptions; one
            # broken signature must not take the whole message down.
            log.exception("DKIM signature %d of %s could not be verified", index, domain)
    return DNS_TEMPORARY_FAILURE if temporary_failure else NO_VALID_SIGNATURE
