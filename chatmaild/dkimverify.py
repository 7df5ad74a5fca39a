"""Incoming DKIM verification with strict alignment, as upstream's filtermail does it.

A message passes when at least one DKIM-Signature verifies and its d= equals the domain of
the From address (case-insensitive): DMARC's strict alignment (adkim=s), without looking
at DMARC policy records, SPF or the client's IP address. Mail from an IP-literal domain
(`user@[192.0.2.1]`, sent by IP-only relays, which cannot publish DKIM keys) is not
checked.

Anyone on the internet chooses the d= and s= of the signatures we look up, so the key
lookups are built to be cheap to wait for: they are asynchronous (no thread waits on DNS),
all lookups of one message share one time budget, a name being looked up for one message
is not looked up again for another, few lookups per signing domain run at once, and a
failed lookup is remembered briefly. A message whose keys cannot be fetched in time gets a
temporary error at once; the sender retries.

dkimpy and dnspython are imported here only, so the outgoing filter never loads them.
"""

import asyncio
import collections
import contextlib
import logging
import time

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

log = logging.getLogger(__name__)

NO_SIGNATURE = "554 5.7.1 No DKIM signature found"
NO_VALID_SIGNATURE = "554 5.7.1 No valid DKIM signature found"
# Not upstream's: a key that could not be looked up is a reason to try again later, not to
# bounce the mail.
DNS_TEMPORARY_FAILURE = "451 4.4.3 Temporary DNS failure while verifying DKIM signature"

# All key lookups of one message together; far below Postfix's smtpd_proxy_timeout
# (100 s), after which the sender would see a timeout instead of our answer.
KEY_LOOKUP_BUDGET = 10.0
# One lookup's own limit. A lookup outlives the budget of the message that started it, so
# that its answer is cached for the sender's retry.
DNS_LIFETIME = 20.0
# Each verification hashes the whole body again; a flood of signatures must not turn one
# message into minutes of work. Legitimate mail has one aligned signature, rarely two.
MAX_ALIGNED_SIGNATURES = 5
# dkimpy computes RSA in Python, holding the interpreter for the whole computation, and the
# sender chooses the key: a 16384-bit modulus with an exponent as long takes 27 s a
# signature and stops every other session meanwhile. Real keys have 1024 to 4096 bits
# (RFC 8301) and e = 65537; OpenSSL refuses exponents over 64 bits for large moduli.
MAX_RSA_MODULUS_BITS = 8192
MAX_RSA_EXPONENT_BITS = 64
# Lookups of one signing domain running at once; the others wait (within their budget).
MAX_LOOKUPS_PER_DOMAIN = 4
CACHE_SIZE = 1000
MAX_CACHE_TTL = 3600
NEGATIVE_CACHE_TTL = 300
# A zone that did not answer is asked again after this long; until then its mail gets a
# temporary error without waiting.
FAILURE_CACHE_TTL = 30


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


def query_name(name):
    """The lower-case text of a key record's name, or None if it cannot be a DNS name."""
    try:
        text = name.decode("ascii") if isinstance(name, bytes) else str(name)
    except UnicodeDecodeError:
        return None
    return text.lower()


def signing_domain(qname):
    """The d= part of 'selector._domainkey.domain.', which lookups are grouped by."""
    return qname.rpartition("._domainkey.")[2] or qname


class TxtLookup:
    """Asynchronous DNS TXT lookups of DKIM keys with a small TTL-bounded LRU cache.

    `await lookup(name)` returns the record as bytes, None if the name or record does not
    exist, and raises DnsTemporaryError on timeouts and server failures (remembered for
    FAILURE_CACHE_TTL seconds). Concurrent calls for one name share one query.
    `nameservers`/`port` replace /etc/resolv.conf, for tests.
    """

    def __init__(self, lifetime=DNS_LIFETIME, nameservers=None, port=53,
                 cache_size=CACHE_SIZE, clock=time.monotonic,
                 per_domain=MAX_LOOKUPS_PER_DOMAIN):
        self.lifetime = lifetime
        self.nameservers = nameservers
        self.port = port
        self.cache_size = cache_size
        self.clock = clock
        self.per_domain = per_domain
        self.queries = 0
        self._cache = collections.OrderedDict()
        self._running = {}  # name -> the task looking it up
        self._domain_slots = {}  # signing domain -> [semaphore, users]
        self._resolver = None

    async def __call__(self, name, timeout=None):
        qname = query_name(name)
        if qname is None:
            return None
        found, value = self._cached(qname)
        if not found:
            task = self._running.get(qname)
            if task is None:
                task = asyncio.ensure_future(self._lookup(qname))
                self._running[qname] = task
                task.add_done_callback(lambda _: self._running.pop(qname, None))
            # A caller whose budget runs out stops waiting; the query goes on for the
            # other waiters and the cache.
            value = await asyncio.shield(task)
        if isinstance(value, DnsTemporaryError):
            raise value
        return value

    def _cached(self, qname):
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
        self._cache[qname] = (self.clock() + ttl, value)
        self._cache.move_to_end(qname)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, qname):
        """The record, None, or the DnsTemporaryError to raise (returned, not raised: a
        task whose waiters all gave up must not log an unretrieved exception)."""
        async with self._domain_slot(signing_domain(qname)):
            try:
                value, ttl = await self._query(qname)
            except DnsTemporaryError as exc:
                value, ttl = exc, FAILURE_CACHE_TTL
        self._remember(qname, value, ttl)
        return value

    @contextlib.asynccontextmanager
    async def _domain_slot(self, domain):
        slot = self._domain_slots.setdefault(domain, [asyncio.Semaphore(self.per_domain), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if not slot[1]:
                del self._domain_slots[domain]

    def _get_resolver(self):
        import dns.asyncresolver

        if self._resolver is None:
            if self.nameservers is None:
                resolver = dns.asyncresolver.Resolver()  # reads /etc/resolv.conf
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = list(self.nameservers)
                resolver.port = self.port
            self._resolver = resolver
        return self._resolver

    async def _query(self, qname):
        """(record or None, seconds to cache it)."""
        import dns.exception
        import dns.resolver

        self.queries += 1
        try:
            answer = await self._get_resolver().resolve(
                qname, "TXT", lifetime=self.lifetime, search=False
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


class Signature:
    """One DKIM-Signature header: its position, d= (lower-case str or None) and the name
    of its key record as dkimpy will ask for it (or None)."""

    def __init__(self, index, domain, key_name):
        self.index = index
        self.domain = domain
        self.key_name = key_name


def read_signature(index, value):
    try:
        tags = parse_tag_value(value)
    except (InvalidTagValueList, ValueError):
        return Signature(index, None, None)
    domain, selector = tags.get(b"d"), tags.get(b"s")
    key_name = None
    if domain and selector:
        key_name = query_name(selector + b"._domainkey." + domain + b".")
    try:
        domain = domain.strip().decode("ascii").lower() if domain else None
    except UnicodeDecodeError:
        domain = None
    return Signature(index, domain, key_name)


def signatures_of(verifier):
    values = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    return [read_signature(index, value) for index, value in enumerate(values)]


def aligned_signatures(content, from_domain):
    """(dkimpy verifier, the signatures worth verifying) or the SMTP reply when none is.

    `from_domain` is the domain of the From address, or None when the From header has no
    single usable address (then no signature can be aligned).
    """
    try:
        verifier = dkim.DKIM(content)
        signatures = signatures_of(verifier)
    except Exception as exc:  # dkimpy's parser on hostile input
        log.info("DKIM: cannot parse message: %s", exc)
        return NO_VALID_SIGNATURE
    if not signatures:
        return NO_SIGNATURE
    wanted = comparable_domain(from_domain) if from_domain else None
    aligned = [
        signature for signature in signatures
        if wanted is not None and signature.domain is not None
        and comparable_domain(signature.domain) == wanted
    ]
    return verifier, aligned[:MAX_ALIGNED_SIGNATURES]


def costly_key_problem(name, record):
    """Why verifying with the key `record` could take seconds of CPU, or None."""
    try:
        key, _, key_type, _ = dkim.evaluate_pk(name, record)
    except Exception:  # dkimpy says what is wrong with it when it verifies
        return None
    if key_type != b"rsa":
        return None
    if key["modulus"].bit_length() > MAX_RSA_MODULUS_BITS:
        return f"an RSA modulus of {key['modulus'].bit_length()} bits"
    if key["publicExponent"].bit_length() > MAX_RSA_EXPONENT_BITS:
        return f"an RSA exponent of {key['publicExponent'].bit_length()} bits"
    return None


def without_costly_keys(dnsfunc):
    """`dnsfunc` answering no key (an invalid signature) for a key too costly to use."""

    def lookup(name, timeout=None):
        record = dnsfunc(name, timeout=timeout)
        problem = record and costly_key_problem(name, record)
        if problem:
            log.warning("DKIM key %s refused: %s", query_name(name), problem)
            return None
        return record

    return lookup


def verify_signatures(verifier, signatures, dnsfunc):
    """None if one of `signatures` verifies, else the SMTP reply to refuse the message."""
    dnsfunc = without_costly_keys(dnsfunc)
    temporary_failure = False
    for signature in signatures:
        index, domain = signature.index, signature.domain
        try:
            if verifier.verify(idx=index, dnsfunc=dnsfunc):
                # which key vouched for the message: what an admin (or a test) checks
                # when a relay moves or rotates its key
                log.info("DKIM signature of d=%s verified with key %s", domain,
                         signature.key_name)
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


async def check_dkim_async(content, from_domain, lookup, budget=KEY_LOOKUP_BUDGET):
    """None if `content` carries a valid DKIM signature aligned with `from_domain`, else
    the SMTP reply to refuse it with. The keys come from the asynchronous `lookup` within
    `budget` seconds; the CPU work (parsing, hashing, RSA) runs in worker threads."""
    if from_domain and is_ip_literal(from_domain):
        return None
    prepared = await asyncio.to_thread(aligned_signatures, content, from_domain)
    if isinstance(prepared, str):
        return prepared
    verifier, signatures = prepared
    names = {signature.key_name for signature in signatures if signature.key_name}
    keys = await fetch_keys(names, lookup, budget)
    return await asyncio.to_thread(verify_signatures, verifier, signatures,
                                   fetched_keys_dnsfunc(keys))


async def fetch_keys(names, lookup, budget):
    """{name: record, None, or the DnsTemporaryError} of every name, within `budget`."""
    if not names:
        return {}
    tasks = {name: asyncio.ensure_future(lookup(name)) for name in names}
    _, late = await asyncio.wait(tasks.values(), timeout=budget)
    keys = {}
    for name, task in tasks.items():
        if task in late:
            task.cancel()
            keys[name] = DnsTemporaryError(f"{name}: no answer within {budget:g} s")
        elif isinstance(task.exception(), DnsTemporaryError):
            keys[name] = task.exception()
        elif task.exception() is not None:
            log.error("DKIM key lookup of %s failed", name, exc_info=task.exception())
            keys[name] = DnsTemporaryError(f"{name}: lookup failed")
        else:
            keys[name] = task.result()
    return keys


def fetched_keys_dnsfunc(keys):
    """A dkimpy `dnsfunc` that answers from the keys fetched before verification."""

    def dnsfunc(name, timeout=None):
        value = keys.get(query_name(name))
        if isinstance(value, Exception):
            raise value
        return value

    return dnsfunc
