"""`chatmail dns --check`: what DNS serves now, compared with the records the relay needs
(chatmaild.admin.dnsrecords), asked of the domain's authoritative servers or of given
name servers.
"""

import re
from dataclasses import dataclass

from .dnsrecords import sts_id_from_txt

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
