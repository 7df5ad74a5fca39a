"""`chatmail dns`: the records a relay needs as a zone file (dnsrecords), and with --check
a comparison with what DNS serves now (dnscheck).
"""

from pathlib import Path

from .dnscheck import (
    LookupFailed,
    Resolver,
    check_records,
    check_summary,
    format_check,
    txt_strings,
)
from .dnsrecords import (
    LETSENCRYPT_DIR,
    DnsError,
    RelayFacts,
    acme_account_uri,
    acme_caa_issuer,
    dkim_public_key,
    host_ipv4_addresses,
    host_ipv6_addresses,
    ipv4_relay_text,
    new_sts_id,
    relay_records,
    sts_id_from_txt,
    zone_text,
)

def gather_facts(config, ipv4=None, ipv6=None, dkim_key=None,
                 letsencrypt_dir=LETSENCRYPT_DIR, resolver=None, problems=None,
                 dkim_keys=None):
    """The facts from options, the host and DNS; `problems` collects what is missing.
    dkim_keys: the relay's keys (dkimrotate.DomainKeys) when dkim_key is the active one's."""
    problems = problems if problems is not None else []
    facts = RelayFacts(
        ipv4=list(ipv4) if ipv4 else host_ipv4_addresses(),
        ipv6=list(ipv6) if ipv6 else host_ipv6_addresses(),
    )
    try:
        facts.dkim_public_key = dkim_public_key(dkim_key)
    except DnsError as exc:
        problems.append(str(exc))
    if dkim_keys is not None:
        add_rotation_facts(facts, dkim_keys, problems)
    if config.tls_cert_mode == "acme":
        facts.caa_issuer = acme_caa_issuer(config.mail_domain_bare, letsencrypt_dir)
        if facts.caa_issuer:
            facts.acme_account_uri = acme_account_uri(config.mail_domain_bare, letsencrypt_dir)
        facts.sts_id = published_sts_id(config, resolver) or new_sts_id()
    return facts


def add_rotation_facts(facts, keys, problems):
    """The selector in use, a key waiting for its record, the records that may go."""
    facts.dkim_selector = keys.active.selector
    facts.dkim_retired = list(keys.retired)
    if keys.pending:
        try:
            facts.dkim_pending = (keys.pending.selector, dkim_public_key(keys.pending.path))
        except DnsError as exc:
            problems.append(str(exc))


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
        letsencrypt_dir=LETSENCRYPT_DIR, timeout=5.0, dkim_keys=None):
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
    facts = gather_facts(config, ipv4, ipv6, dkim_key, letsencrypt_dir, resolver, problems,
                         dkim_keys)
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
