"""`chatmail dns`: the DNS records a relay needs, as a zone file, and a check of what DNS
serves now.

The records are upstream's (cmdeploy dns): required are the addresses, MX, the DKIM key,
www and, with ACME certificates, MTA-STS; recommended are SPF, DMARC, CAA, ADSP and the
SRV records that let clients find the servers. An IPv4 relay (mail_domain is an IP
address) needs no DNS at all.
"""

import ipaddress
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TTL = 3600
DKIM_SELECTOR = "opendkim"

LETSENCRYPT_DIR = "/etc/letsencrypt"
# certbot keeps accounts per ACME server: accounts/<host><path>/<account id>/regr.json
LETSENCRYPT_SERVER = "acme-v02.api.letsencrypt.org/directory"
TXT_CHUNK = 255  # a TXT record is a list of strings of at most 255 bytes each

# ifa_flags in /proc/net/if_inet6: privacy (temporary) and deprecated addresses change
# or go away; DNS must name a stable one.
IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20


class DnsError(Exception):
    """Something `chatmail dns` needs is not there; the message says what to do."""


@dataclass(frozen=True)
class Record:
    name: str  # absolute, with the trailing dot
    rtype: str
    value: str  # the record data as written in a zone file
    required: bool
    # Which record among several of one name and type is ours: "spf", "dmarc", "dkim",
    # "adsp", "mta-sts" (TXT) or "" (all records of the name and type).
    kind: str = ""

    def zone_line(self):
        return f"{self.name:<40} {TTL:<6} IN  {self.rtype:<5}  {self.value}"


@dataclass
class RelayFacts:
    """What the records depend on besides chatmail.ini."""

    ipv4: list = field(default_factory=list)
    ipv6: list = field(default_factory=list)
    dkim_public_key: str = ""  # base64 SubjectPublicKeyInfo; "" when unknown
    sts_id: str = ""
    acme_account_uri: str = ""
    # the CAA issuer of the ACME server certbot uses; "" when we do not know its name
    caa_issuer: str = "letsencrypt.org"


# -- the facts ----------------------------------------------------------------------------


def host_ipv4_addresses(fib_trie="/proc/net/fib_trie"):
    """The host's public IPv4 addresses: the kernel's local /32 routes, without private,
    loopback and other non-global ranges (behind NAT the public address is not here)."""
    found, last = [], None
    try:
        lines = Path(fib_trie).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text.startswith("/32 host LOCAL") and last:
            address = ipaddress.IPv4Address(last)
            if address.is_global and str(address) not in found:
                found.append(str(address))
    return found


def host_ipv6_addresses(if_inet6="/proc/net/if_inet6"):
    """The host's stable global IPv6 addresses (no privacy or deprecated addresses)."""
    found = []
    try:
        lines = Path(if_inet6).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        flags = int(fields[4], 16)
        if address.is_global and not flags & (IFA_F_TEMPORARY | IFA_F_DEPRECATED):
            found.append(str(address))
    return sorted(set(found), key=found.index)


def dkim_public_key(key_path):
    """The base64 public key of OpenDKIM's private key, as it goes into the TXT record."""
    try:
        result = subprocess.run(["openssl", "rsa", "-in", str(key_path), "-pubout"],
                                capture_output=True, text=True)
    except FileNotFoundError:
        raise DnsError("openssl is not installed (install the openssl package)") from None
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["openssl failed"])[0]
        if not Path(key_path).exists():
            reason = "it does not exist; 'chatmail configure' creates it"
        elif not _readable(key_path):
            reason = "permission denied; run as root"
        raise DnsError(f"cannot read the DKIM key {key_path}: {reason}")
    return "".join(line for line in result.stdout.splitlines()
                   if line and not line.startswith("-----"))


def _readable(path):
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def acme_account_uri(domain, letsencrypt_dir=LETSENCRYPT_DIR):
    """certbot's Let's Encrypt account URI for the CAA record, or "" if there is none.

    The account of the domain's certificate (renewal/<domain>.conf names it) wins; else
    the only production account there is.
    """
    base = Path(letsencrypt_dir)
    account_id = renewal_account_id(base / "renewal" / f"{domain}.conf")
    accounts = base / "accounts" / LETSENCRYPT_SERVER
    if account_id:
        uri = read_regr_uri(accounts / account_id / "regr.json")
        if uri:
            return uri
    candidates = sorted(accounts.glob("*/regr.json"))
    if len(candidates) == 1:
        return read_regr_uri(candidates[0])
    return ""


def renewal_account_id(conf_path):
    """`account = <id>` from a certbot renewal configuration (configobj syntax)."""
    return renewal_value(conf_path, "account")


def renewal_value(conf_path, key):
    try:
        text = Path(conf_path).read_text()
    except OSError:
        return ""
    match = re.search(rf"(?m)^\s*{key}\s*=\s*(\S+)\s*$", text)
    return match.group(1) if match else ""


def acme_caa_issuer(domain, letsencrypt_dir=LETSENCRYPT_DIR):
    """The CAA issuer name for the ACME server of the domain's certificate: Let's Encrypt's
    (also before certbot has run: it is certbot's default), or "" for another server,
    whose CAA name we cannot know (a record naming Let's Encrypt would block it)."""
    server = renewal_value(Path(letsencrypt_dir) / "renewal" / f"{domain}.conf", "server")
    if server and LETSENCRYPT_SERVER not in server:
        return ""
    return "letsencrypt.org"


def read_regr_uri(path):
    import json

    try:
        return json.loads(Path(path).read_text()).get("uri", "") or ""
    except (OSError, ValueError, AttributeError):
        return ""


def new_sts_id(now=None):
    """A new MTA-STS policy id; upstream's form, the time to the minute (UTC)."""
    return time.strftime("%Y%m%d%H%M", time.gmtime(now))


def sts_id_from_txt(text):
    match = re.search(r"\bid=([A-Za-z0-9]{1,32})", text)
    return match.group(1) if match else ""


# -- the records --------------------------------------------------------------------------


def dkim_txt_value(public_key):
    return f"v=DKIM1;k=rsa;p={public_key};s=email;t=s"


def quote_txt(text):
    """Zone-file TXT data: one quoted string per 255 characters."""
    chunks = [text[i:i + TXT_CHUNK] for i in range(0, len(text), TXT_CHUNK)] or [""]
    return " ".join(f'"{chunk}"' for chunk in chunks)


def relay_records(config, facts):
    """Every record of the relay, required ones first, in upstream's order."""
    d = config.mail_domain_bare + "."
    acme = config.tls_cert_mode == "acme"
    records = [Record(d, "A", ip, True) for ip in facts.ipv4]
    if not config.disable_ipv6:
        records += [Record(d, "AAAA", ip, True) for ip in facts.ipv6]
    records.append(Record(d, "MX", f"10 {d}", True))
    if acme:
        # Sending relays fetch the policy from https://mta-sts.<domain>/ (our certificate
        # covers that name) and insist on TLS with a valid certificate.
        records.append(Record(f"_mta-sts.{d}", "TXT", f'"v=STSv1; id={facts.sts_id}"',
                              True, "mta-sts"))
        records.append(Record(f"mta-sts.{d}", "CNAME", d, True))
    records.append(Record(f"www.{d}", "CNAME", d, True))
    if facts.dkim_public_key:
        records.append(Record(f"{DKIM_SELECTOR}._domainkey.{d}", "TXT",
                              quote_txt(dkim_txt_value(facts.dkim_public_key)), True, "dkim"))
    records += [
        Record(d, "TXT", '"v=spf1 a ~all"', False, "spf"),
        Record(f"_dmarc.{d}", "TXT", '"v=DMARC1;p=reject;adkim=s;aspf=s"', False, "dmarc"),
    ]
    if acme and facts.caa_issuer:
        issuer = facts.caa_issuer
        if facts.acme_account_uri:
            issuer += f";accounturi={facts.acme_account_uri}"
        records.append(Record(d, "CAA", f'0 issue "{issuer}"', False))
    records.append(Record(f"_adsp._domainkey.{d}", "TXT", '"dkim=discardable"', False, "adsp"))
    for service, port in (("submission", 587), ("submissions", 465), ("imap", 143),
                          ("imaps", 993)):
        records.append(Record(f"_{service}._tcp.{d}", "SRV", f"0 1 {port} {d}", False))
    return records


def zone_text(config, facts, records):
    lines = ["; Required DNS entries"]
    lines += [r.zone_line() for r in records if r.required]
    lines += missing_fact_notes(config, facts)
    lines += ["", "; Recommended DNS entries"]
    lines += [r.zone_line() for r in records if not r.required]
    if facts.dkim_public_key:
        lines += ["", "; If your DNS provider's form takes the DKIM TXT value as one string:",
                  f"; {dkim_txt_value(facts.dkim_public_key)}"]
    return "\n".join(lines) + "\n"


def missing_fact_notes(config, facts):
    d = config.mail_domain_bare
    notes = []
    if not facts.ipv4:
        notes.append(f"; No public IPv4 address found on this host. Add '{d}. A <address>' "
                     "if it has one (behind NAT: the public one), or pass --ipv4.")
    if not facts.ipv6 and not config.disable_ipv6:
        notes.append("; No global IPv6 address found on this host (pass --ipv6 if it has one).")
    if not facts.dkim_public_key:
        notes.append("; The DKIM record is missing: the DKIM key could not be read.")
    return notes


def ipv4_relay_text(config):
    ip = config.ipv4_relay
    return (
        f"The mail domain is the IPv4 address {ip}: this relay needs no DNS records.\n"
        f"Its addresses look like name@[{ip}]; other relays connect to {ip} directly,\n"
        "and clients are set up with a dclogin: link or QR code from its web page.\n"
    )


# -- checking -----------------------------------------------------------------------------


class LookupFailed(Exception):
    pass


class Resolver:
    """Answers (name, type) questions with dnspython. `nameservers` None: ask the domain's
    authoritative servers directly, so a record just published is seen at once (caching
    resolvers may still remember that it was missing); the system's resolver if they
    cannot be found."""

    def __init__(self, domain, nameservers=None, port=53, timeout=5.0):
        import dns.resolver

        self.description = ""
        if nameservers is None:
            nameservers = authoritative_addresses(domain, timeout)
            self.description = (f"the authoritative servers of {domain} ({', '.join(nameservers)})"
                                if nameservers else "the system's resolver")
        else:
            self.description = ", ".join(f"{ns} port {port}" for ns in nameservers)
        if nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            # dnspython >= 2.4 binds the port when the nameservers are assigned.
            resolver.port = port
            resolver.nameservers = list(nameservers)
        else:
            resolver = system_resolver()
        resolver.timeout = resolver.lifetime = timeout
        self._resolver = resolver

    def query(self, name, rtype):
        """The record data (dnspython rdata objects); [] if there are none."""
        import dns.exception
        import dns.resolver

        try:
            answer = self._resolver.resolve(name, rtype, raise_on_no_answer=False,
                                            search=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as exc:
            raise LookupFailed(f"{name} {rtype}: {exc}") from None
        if answer.rrset is None:
            return []
        # A CNAME question is answered by the CNAME; any other by the chain's end.
        return [rdata for rdata in answer.rrset]


def system_resolver():
    """dnspython's resolver as /etc/resolv.conf configures it."""
    import dns.exception
    import dns.resolver

    try:
        return dns.resolver.Resolver()
    except dns.exception.DNSException as exc:
        raise LookupFailed(f"no DNS resolver configured: {exc}") from None


def authoritative_addresses(domain, timeout):
    """IPv4 addresses of the servers authoritative for `domain`; [] if unknown."""
    import dns.exception
    import dns.resolver

    try:
        resolver = system_resolver()
        resolver.lifetime = timeout
        zone = dns.resolver.zone_for_name(domain, resolver=resolver, lifetime=timeout)
        names = [ns.target for ns in resolver.resolve(zone, "NS")]
        addresses = []
        for name in names:
            try:
                addresses += [a.address for a in resolver.resolve(name, "A")]
            except dns.exception.DNSException:
                continue
        return addresses
    except (dns.exception.DNSException, OSError, LookupFailed):
        return []


@dataclass
class CheckResult:
    records: list  # what we want published (one or more records of one name and type)
    status: str  # "ok", "missing", "wrong"
    found: str = ""  # what DNS has, for the admin
    note: str = ""
    blocking: bool = False  # makes --check fail

    @property
    def name(self):
        return self.records[0].name

    @property
    def rtype(self):
        return self.records[0].rtype

    @property
    def counts(self):
        """Whether a problem with it makes --check fail."""
        return self.records[0].required or self.blocking


def group_records(records):
    """Records that are checked together: all A (AAAA) records of the domain are one
    question."""
    groups = {}
    for record in records:
        groups.setdefault((record.name, record.rtype, record.kind), []).append(record)
    return list(groups.values())


def check_records(config, facts, records, resolver):
    return [check_group(config, facts, group, resolver) for group in group_records(records)]


def check_group(config, facts, group, resolver):
    rtype = group[0].rtype
    checker = {
        "A": check_addresses, "AAAA": check_addresses, "MX": check_mx,
        "CNAME": check_cname, "TXT": check_txt, "SRV": check_srv, "CAA": check_caa,
    }[rtype]
    result = checker(config, facts, group, resolver)
    if result.status != "ok" and group[0].required:
        result.blocking = True
    return result


def absolute(name):
    text = str(name).lower()
    return text if text.endswith(".") else text + "."


def check_addresses(config, facts, group, resolver):
    found = {rdata.address for rdata in resolver.query(group[0].name, group[0].rtype)}
    wanted = {record.value for record in group}
    shown = " ".join(sorted(found))
    if not found:
        return CheckResult(group, "missing")
    strangers = found - wanted
    if strangers:
        return CheckResult(group, "wrong", shown,
                           f"{' '.join(sorted(strangers))} is not an address of this relay")
    return CheckResult(group, "ok", shown)


def check_mx(config, facts, group, resolver):
    found = resolver.query(group[0].name, "MX")
    shown = ", ".join(sorted(rdata.to_text() for rdata in found))
    if not found:
        return CheckResult(group, "missing")
    if {absolute(rdata.exchange) for rdata in found} != {absolute(group[0].name)}:
        return CheckResult(group, "wrong", shown, "mail for the domain must go to the relay")
    return CheckResult(group, "ok", shown)


def check_cname(config, facts, group, resolver):
    record = group[0]
    found = resolver.query(record.name, "CNAME")
    if found:
        target = absolute(found[0].target)
        if target == absolute(record.value):
            return CheckResult(group, "ok", target)
        return CheckResult(group, "wrong", target, f"must point to {record.value}")
    # An address record with the relay's addresses serves certbot and browsers as well.
    addresses = {rdata.address for rtype in ("A", "AAAA")
                 for rdata in resolver.query(record.name, rtype)}
    ours = set(facts.ipv4) | set(facts.ipv6)
    if addresses and ours and addresses <= ours:
        return CheckResult(group, "ok", " ".join(sorted(addresses)),
                           "address records instead of a CNAME, with this relay's addresses")
    if addresses:
        return CheckResult(group, "wrong", " ".join(sorted(addresses)),
                           f"must be a CNAME to {record.value}")
    return CheckResult(group, "missing")


TXT_MARKERS = {"spf": "v=spf1", "dmarc": "v=DMARC1", "dkim": "v=DKIM1", "adsp": "dkim=",
               "mta-sts": "v=STSv1"}


def txt_strings(rdata):
    return b"".join(rdata.strings).decode("utf-8", "replace")


def unquote_txt(value):
    """Zone-file TXT data back to the text it stands for."""
    return "".join(re.findall(r'"([^"]*)"', value))


def tag_list(text):
    """'v=DKIM1; k=rsa; p=...' -> {'v': 'DKIM1', ...} (tag=value syntax, RFC 6376 3.2)."""
    tags = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = re.sub(r"\s+", "", value)
    return tags


def txt_matches(kind, found_text, wanted_text):
    if kind == "mta-sts":
        # Any id will do: it only has to change when the policy does.
        return tag_list(found_text).get("v") == "STSv1" and bool(sts_id_from_txt(found_text))
    if kind == "spf":
        return found_text.split() == wanted_text.split()
    return tag_list(found_text) == tag_list(wanted_text)


def check_txt(config, facts, group, resolver):
    record = group[0]
    marker = TXT_MARKERS[record.kind]
    texts = [txt_strings(rdata) for rdata in resolver.query(record.name, "TXT")]
    ours = [text for text in texts if text.lower().startswith(marker.lower())]
    if not ours:
        return CheckResult(group, "missing")
    shown = " | ".join(ours)
    if len(ours) > 1 and record.kind in ("spf", "dmarc", "dkim"):
        return CheckResult(group, "wrong", shown,
                           f"{len(ours)} such records: receivers then use none of them")
    if not txt_matches(record.kind, ours[0], unquote_txt(record.value)):
        return CheckResult(group, "wrong", shown)
    return CheckResult(group, "ok", shown)


def check_srv(config, facts, group, resolver):
    record = group[0]
    found = resolver.query(record.name, "SRV")
    if not found:
        return CheckResult(group, "missing")
    _, _, port, target = record.value.split()
    shown = ", ".join(rdata.to_text() for rdata in found)
    if all(rdata.port == int(port) and absolute(rdata.target) == absolute(target)
           for rdata in found):
        return CheckResult(group, "ok", shown)
    return CheckResult(group, "wrong", shown)


def caa_issuers(found):
    """(issuer domain, parameters) of every 'issue' property."""
    issuers = []
    for rdata in found:
        if rdata.tag.decode().lower() != "issue":
            continue
        issuer, _, params = rdata.value.decode().partition(";")
        issuers.append((issuer.strip().lower(), tag_list(params)))
    return issuers


def check_caa(config, facts, group, resolver):
    found = resolver.query(group[0].name, "CAA")
    if not found:
        return CheckResult(group, "missing")
    shown = ", ".join(rdata.to_text() for rdata in found)
    issuers = caa_issuers(found)
    ours = facts.acme_account_uri
    allowing = [params for issuer, params in issuers
                if issuer == "letsencrypt.org"
                and (not ours or params.get("accounturi", ours) == ours)]
    if issuers and not allowing:
        # Let's Encrypt refuses to issue: certbot cannot renew the certificate.
        return CheckResult(group, "wrong", shown,
                           "it forbids Let's Encrypt to issue this relay's certificate",
                           blocking=True)
    if ours and not any(params.get("accounturi") == ours for params in allowing):
        return CheckResult(group, "wrong", shown, "it does not name this relay's ACME account")
    return CheckResult(group, "ok", shown)


SHORT = 72


def format_check(results):
    lines = []
    for result in results:
        label = {"ok": "OK", "missing": "MISSING", "wrong": "WRONG"}[result.status]
        if result.status != "ok" and not result.counts:
            label += "*"
        found = result.found
        if result.status == "ok" and len(found) > SHORT:
            found = found[:SHORT - 3] + "..."  # a correct DKIM key need not fill the screen
        lines.append(f"{label:<9} {result.name} {result.rtype}" + (f": {found}" if found else ""))
        if result.note:
            lines.append(f"{'':<9} ({result.note})")
        if result.status != "ok":
            lines += [f"{'':<9} publish: {record.zone_line()}" for record in result.records]
    return lines


def check_summary(results):
    blocking = [r for r in results if r.status != "ok" and r.blocking]
    recommended = [r for r in results if r.status != "ok" and not r.blocking]
    lines = []
    if recommended:
        lines.append(f"* {len(recommended)} recommended record(s) missing or different: "
                     "the relay works without them, but other servers trust it more with them.")
    if blocking:
        lines.append(f"{len(blocking)} required record(s) missing or wrong: publish them at "
                     "your DNS provider, then check again.")
    else:
        lines.append("All required records are in place.")
    return lines, (1 if blocking else 0)


# -- command ------------------------------------------------------------------------------


def gather_facts(config, ipv4=None, ipv6=None, dkim_key=None,
                 letsencrypt_dir=LETSENCRYPT_DIR, resolver=None, problems=None):
    """The facts from options, the host and DNS; `problems` collects what is missing."""
    problems = problems if problems is not None else []
    facts = RelayFacts(
        ipv4=list(ipv4) if ipv4 else host_ipv4_addresses(),
        ipv6=list(ipv6) if ipv6 else host_ipv6_addresses(),
    )
    try:
        facts.dkim_public_key = dkim_public_key(dkim_key)
    except DnsError as exc:
        problems.append(str(exc))
    if config.tls_cert_mode == "acme":
        facts.caa_issuer = acme_caa_issuer(config.mail_domain_bare, letsencrypt_dir)
        if facts.caa_issuer:
            facts.acme_account_uri = acme_account_uri(config.mail_domain_bare, letsencrypt_dir)
        facts.sts_id = published_sts_id(config, resolver) or new_sts_id()
    return facts


def published_sts_id(config, resolver):
    """The id already in DNS: a new one would tell senders the policy changed."""
    if resolver is None:
        return ""
    try:
        texts = [txt_strings(r) for r in resolver.query(f"_mta-sts.{config.mail_domain_bare}.",
                                                          "TXT")]
    except LookupFailed:
        return ""
    return next((sts_id_from_txt(t) for t in texts if sts_id_from_txt(t)), "")


def run(config, out=print, check=False, zonefile=None, ipv4=None, ipv6=None,
        nameservers=None, port=53, dkim_key=None,
        letsencrypt_dir=LETSENCRYPT_DIR, timeout=5.0):
    """The `chatmail dns` command; returns the exit status."""
    if config.ipv4_relay:
        out(ipv4_relay_text(config).rstrip("\n"))
        return 0
    resolver = None
    if check or nameservers or config.tls_cert_mode == "acme":
        # Printing the zone asks DNS only for the MTA-STS id in use, and briefly.
        try:
            resolver = Resolver(config.mail_domain_bare + ".", nameservers, port,
                                timeout if check else min(timeout, 2.0))
        except LookupFailed as exc:
            if check:
                out(f"chatmail dns: {exc}")
                return 1
    problems = []
    facts = gather_facts(config, ipv4, ipv6, dkim_key, letsencrypt_dir, resolver, problems)
    records = relay_records(config, facts)
    text = zone_text(config, facts, records)
    if zonefile:
        Path(zonefile).write_text(text)
        out(f"Wrote the DNS records of {config.mail_domain_bare} to {zonefile}.")
    elif not check:
        out(text.rstrip("\n"))
    for problem in problems:
        out(f"chatmail dns: {problem}")
    if not check:
        return 1 if problems else 0
    return run_check(config, facts, records, resolver, out, problems)


def run_check(config, facts, records, resolver, out, problems):
    out(f"Checking the DNS records of {config.mail_domain_bare} with {resolver.description}:")
    try:
        results = check_records(config, facts, records, resolver)
    except LookupFailed as exc:
        out(f"chatmail dns: DNS lookup failed: {exc}")
        return 1
    for line in format_check(results):
        out(line)
    lines, status = check_summary(results)
    for line in lines:
        out(line)
    if problems:
        out("The DKIM record could not be checked (see above).")
        status = 1
    return status
