"""conf/postfix rendered for every relay configuration, applied with the real postconf to
scratch copies of Debian's main.cf and master.cf, and judged by postconf itself."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatmaild.admin.components import postconf as postconf_edits
from chatmaild.admin.components import postfix
from chatmaild.admin.host import Host, run_command
from chatmaild.admin.platform import load_platform

pytestmark = pytest.mark.skipif(not shutil.which("postconf", path="/usr/sbin:/usr/bin"),
                                reason="needs Debian's postfix package")

ADMIN_MAIN = """\
# the admin's own settings, unrelated to chatmail
smtpd_tls_loglevel = 1
delay_warning_time = 4h
relayhost = [smarthost.example.net]:587
"""
ADMIN_SERVICE = "2525      inet  n       -       y       -       -       smtpd\n"

# What upstream's cmdeploy left in a relay's main.cf and master.cf that we do not use.
UPSTREAM_MAIN = """\
default_transport = lmtp-filtermail:inet:[127.0.0.1]:10083
lmtp-filtermail_initial_destination_concurrency = 10000
lmtp-filtermail_destination_concurrency_limit = 10000
virtual_mailbox_domains = chat.example.org
virtual_transport = lmtp:unix:private/dovecot-lmtp
"""
UPSTREAM_MASTER = """\
127.0.0.1:10026 inet  n       -       n       -       100      smtpd
  -o syslog_name=postfix/reinject_incoming
  -o smtpd_relay_restrictions=reject_unauth_destination
  -o smtpd_milters=unix:opendkim/opendkim.sock
lmtp-filtermail unix  -       -       y       -       500       lmtp
  -o syslog_name=postfix/lmtp-filtermail
  -o lmtp_header_checks=
  -o lmtp_tls_security_level=none
"""


def settle(config_dir):
    """Date main.cf back: postconf pauses up to two seconds reading a main.cf written
    within the last second or two, which would make these tests slow."""
    main_cf = Path(config_dir) / "main.cf"
    if main_cf.exists():
        past = main_cf.stat().st_mtime - 10
        os.utime(main_cf, (past, past))


def postconf(config_dir, *args):
    settle(config_dir)
    proc = subprocess.run(["/usr/sbin/postconf", "-c", str(config_dir), *args],
                          capture_output=True, text=True, check=True)
    assert proc.stderr == "", proc.stderr
    return proc.stdout


def apply(items, platform):
    settle(platform.postfix_config_dir)
    return postfix.apply(items, platform)


def main_settings(config_dir):
    settle(config_dir)
    return postfix.live_main(config_dir)


def service_params(config_dir):
    settle(config_dir)
    return postfix.live_params(config_dir)


def service_fields(config_dir):
    settle(config_dir)
    return postfix.live_fields(config_dir)


@pytest.fixture
def live_dir(tmp_path):
    """An empty stand-in for /etc/postfix. Debian's postfix with debconf "No configuration"
    leaves no main.cf (but a master.cf, see seed_debian)."""
    path = tmp_path / "etc-postfix"
    path.mkdir()
    return path


def live_platform(name, live_dir, **facts):
    """Platform NAME, but with its live Postfix configuration in live_dir (and FACTS)."""
    return SimpleNamespace(**{**vars(load_platform(name)), "postfix_config_dir": str(live_dir),
                              **facts})


@pytest.fixture
def platform(live_dir, tmp_path):
    """debian12, but with its live Postfix configuration in live_dir."""
    return live_platform("debian12", live_dir, state_dir=str(tmp_path / "state"))


@pytest.fixture
def rendered(relay_config, debian12, render):
    """conf/postfix for each configuration of the matrix."""
    return render("postfix", relay_config, debian12)


@pytest.fixture
def domain_rendered(make_config, debian12, render):
    """conf/postfix for a plain domain relay, for tests the configuration does not affect."""
    return render("postfix", make_config(), debian12)


def postconf_items(rendered):
    return [item for item in rendered.values() if item.kind.startswith("postconf-")]


def seed_debian(live_dir, extra_main="", extra_master=""):
    """A main.cf and master.cf as Debian installs them, plus `extra` lines."""
    main = Path("/usr/share/postfix/main.cf.debian").read_text() + extra_main
    master = Path("/usr/share/postfix/master.cf.dist").read_text() + extra_master
    (live_dir / "main.cf").write_text(main)
    (live_dir / "master.cf").write_text(master)
    settle(live_dir)


# --- postconf's verdict ----------------------------------------------------------------------

def test_validates_without_a_word_from_postconf(rendered, platform):
    assert postfix.validate(list(rendered.values()), platform) == []


def test_alpines_configuration_validates_too(relay_config, render, live_dir):
    """Alpine's settings (LMDB maps, no chroot, the CA bundle file) applied to Debian's
    main.cf and master.cf, as Alpine's postfix package ships Postfix's own."""
    alpine = live_platform("alpine", live_dir)
    seed_debian(live_dir)
    rendered = render("postfix", relay_config, alpine)
    assert postfix.validate(list(rendered.values()), alpine) == []


def test_validate_leaves_the_live_configuration_alone(domain_rendered, platform, live_dir):
    seed_debian(live_dir)
    before = {p.name: p.read_bytes() for p in live_dir.iterdir()}
    postfix.validate(list(domain_rendered.values()), platform)
    assert {p.name: p.read_bytes() for p in live_dir.iterdir()} == before


def test_unknown_parameter_is_reported_with_postconf_words(domain_rendered, debian12):
    main = domain_rendered["/etc/postfix/main.cf"]
    main.content += "smtpd_tls_loglevle = 1\n"
    problems = postfix.validate(list(domain_rendered.values()), debian12)
    # The message names the live file, not the scratch copy postconf saw.
    assert problems == [
        "postconf: warning: /etc/postfix/main.cf: unused parameter: smtpd_tls_loglevle=1"]


def test_bad_master_field_is_reported(domain_rendered, platform):
    master = domain_rendered["/etc/postfix/master.cf"]
    master.content = master.content.replace("100      smtpd", "many     smtpd")
    [problem] = postfix.validate(list(domain_rendered.values()), platform)
    assert 'invalid process_limit field "many"' in problem


def test_undefined_restriction_class_is_reported(domain_rendered, debian12):
    master = domain_rendered["/etc/postfix/master.cf"]
    master.content = master.content.replace("$mua_client_restrictions", "$mua_client_restriction")
    problems = postfix.validate(list(domain_rendered.values()), debian12)
    assert ("postconf: warning: /etc/postfix/master.cf: undefined parameter: "
            "mua_client_restriction") in problems


def test_broken_lookup_table_is_reported_by_postmap(domain_rendered, platform):
    domain_rendered["/etc/postfix/login_map"].content = "/^(.*$/\t${1}\n"
    problems = postfix.validate(list(domain_rendered.values()), platform)
    assert problems == [
        "postmap: warning: regexp map /etc/postfix/login_map, line 1: Unmatched ( or \\("]


def test_table_named_but_not_rendered_is_reported(domain_rendered, platform):
    del domain_rendered["/etc/postfix/lmtp_header_cleanup"]
    problems = postfix.validate(list(domain_rendered.values()), platform)
    assert problems == ["regexp:/etc/postfix/lmtp_header_cleanup is named in the Postfix "
                        "settings but not rendered"]


# --- what we set -------------------------------------------------------------------------------

@pytest.fixture
def applied(rendered, platform, live_dir):
    """live_dir after apply(): main.cf settings and master.cf -o parameters."""
    apply(postconf_items(rendered), platform)
    return SimpleNamespace(main=main_settings(live_dir), params=service_params(live_dir),
                           fields=service_fields(live_dir))


def test_identity_and_local_delivery(applied, relay_config):
    main = applied.main
    assert main["myhostname"] == relay_config.postfix_myhostname
    assert main["myorigin"] == relay_config.mail_domain
    # [a.b.c.d] for IPv4 relays, so mail to user@[a.b.c.d] is delivered locally.
    assert main["mydestination"] == relay_config.mail_domain
    assert main["local_transport"] == "lmtp:unix:private/dovecot-lmtp"
    assert main["local_recipient_maps"] == ""
    assert main["alias_maps"] == main["alias_database"] == "hash:/etc/aliases"
    assert main["message_size_limit"] == str(relay_config.max_message_size)
    assert main["recipient_delimiter"] == "+"


def test_delivery_through_postfix_smtp_with_verified_tls(applied):
    main = applied.main
    assert "default_transport" not in main
    assert main["smtp_tls_security_level"] == "verify"
    assert main["smtp_tls_policy_maps"] == "regexp:/etc/postfix/smtp_tls_policy_map"
    assert main["smtp_address_preference"] == "ipv4"
    assert main["smtp_tls_CApath"] == "/etc/ssl/certs"
    assert main["smtp_tls_mandatory_protocols"] == ">=TLSv1.2"
    # no resumption: a full handshake ends with the server's ticket, which acknowledges our
    # TLS Finished at once (bench/results/starttls-tickets.md); Debian's main.cf sets one
    assert main["smtp_tls_session_cache_database"] == ""


def test_server_tls_certificate(applied, relay_config):
    assert applied.main["smtpd_tls_cert_file"] == relay_config.tls_cert_path
    assert applied.main["smtpd_tls_key_file"] == relay_config.tls_key_path
    assert applied.main["smtpd_relay_restrictions"] == "reject"


def test_ip_protocols(applied, relay_config):
    main = applied.main
    if relay_config.disable_ipv6:
        assert main["inet_protocols"] == "ipv4"
        assert main["mynetworks"] == "127.0.0.0/8"
    else:
        assert main["inet_protocols"] == "all"
        assert main["mynetworks"] == "127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128"
    assert main["inet_interfaces"] == "all"


def test_header_cleanup(applied):
    assert applied.main["lmtp_header_checks"] == "regexp:/etc/postfix/lmtp_header_cleanup"
    assert applied.main["disable_mime_input_processing"] == "yes"
    assert applied.params["authclean/unix"] == {
        "header_checks": "regexp:/etc/postfix/submission_header_cleanup"}
    assert applied.params["127.0.0.1:10025/inet"]["cleanup_service_name"] == "authclean"


def test_port_25_requires_starttls_and_goes_through_the_incoming_filter(applied):
    smtp = applied.params["smtp/inet"]
    assert smtp["smtpd_tls_security_level"] == "encrypt"
    assert smtp["smtpd_tls_mandatory_protocols"] == ">=TLSv1.2"
    assert smtp["smtpd_proxy_filter"] == "127.0.0.1:10081"
    assert smtp["smtpd_relay_restrictions"] == "reject_unauth_destination"
    assert applied.fields["smtp/inet"]["chroot"] == "y"


@pytest.mark.parametrize("service", ["submission/inet", "smtps/inet"])
def test_submission_ports_need_tls13_and_a_dovecot_login(applied, relay_config, service):
    params = applied.params[service]
    assert params["smtpd_tls_security_level"] == "encrypt"
    assert params["smtpd_tls_mandatory_protocols"] == ">=TLSv1.3"
    assert params["smtpd_sasl_auth_enable"] == "yes"
    assert params["smtpd_sasl_type"] == "dovecot"
    assert params["smtpd_sasl_path"] == "private/auth"
    assert params["smtpd_sender_restrictions"] == "$mua_sender_restrictions"
    assert params["smtpd_relay_restrictions"] == "permit_sasl_authenticated,reject"
    assert params["smtpd_proxy_filter"] == "127.0.0.1:10080"
    limit = relay_config.max_smtp_connections
    assert params["smtpd_client_connection_count_limit"] == str(limit // 5)
    assert applied.fields[service]["process_limit"] == str(limit)
    assert applied.main["smtpd_sender_login_maps"] == "regexp:/etc/postfix/login_map"
    assert applied.main["mua_sender_restrictions"] == (
        "reject_sender_login_mismatch, permit_sasl_authenticated, reject")


def test_smtps_is_implicit_tls(applied):
    assert applied.params["smtps/inet"]["smtpd_tls_wrappermode"] == "yes"
    assert "smtpd_tls_wrappermode" not in applied.params["submission/inet"]


def test_reinjection_services_listen_on_loopback_only(applied):
    for port in (10025, 10026):
        fields = applied.fields[f"127.0.0.1:{port}/inet"]
        assert (fields["chroot"], fields["process_limit"], fields["command"].split()[0]) == (
            "n", "100", "smtpd")
    assert applied.params["127.0.0.1:10026/inet"]["smtpd_relay_restrictions"] == (
        "reject_unauth_destination")
    assert "smtpd_milters" not in applied.params["127.0.0.1:10026/inet"]


def test_opendkim_milter_only_without_ipv4_literal(applied, relay_config):
    reinject = applied.params["127.0.0.1:10025/inet"]
    assert reinject["milter_macro_daemon_name"] == "ORIGINATING"
    milters = {key: applied.main.get(key) for key in
               ("non_smtpd_milters", "internal_mail_filter_classes", "milter_macro_daemon_name")}
    if relay_config.ipv4_relay:
        assert "smtpd_milters" not in reinject
        assert milters == dict.fromkeys(milters)
    else:
        assert reinject["smtpd_milters"] == "unix:opendkim/opendkim.sock"
        assert milters == {"non_smtpd_milters": "unix:opendkim/opendkim.sock",
                           "internal_mail_filter_classes": "bounce",
                           "milter_macro_daemon_name": "ORIGINATING"}


def test_ports_follow_the_ini(make_config, debian12, render, platform, live_dir):
    config = make_config(filtermail_smtp_port="20080", filtermail_smtp_port_incoming="20081",
                         postfix_reinject_port="20025", postfix_reinject_port_incoming="20026",
                         max_smtp_connections="50", max_message_size="1000000")
    items = postconf_items(render("postfix", config, debian12))
    apply(items, platform)
    params = service_params(live_dir)
    assert params["smtp/inet"]["smtpd_proxy_filter"] == "127.0.0.1:20081"
    assert params["submission/inet"]["smtpd_proxy_filter"] == "127.0.0.1:20080"
    assert params["submission/inet"]["smtpd_client_connection_count_limit"] == "10"
    assert {"127.0.0.1:20025/inet", "127.0.0.1:20026/inet"} <= set(params)
    assert main_settings(live_dir)["message_size_limit"] == "1000000"


# --- how we set it -----------------------------------------------------------------------------

def test_missing_main_cf_starts_from_debians_and_works(domain_rendered, platform, live_dir):
    result = apply(postconf_items(domain_rendered), platform)
    assert result.changed == [f"{live_dir}/main.cf", f"{live_dir}/master.cf"]
    assert (result.reload, result.restart) == ({"postfix"}, {"postfix"})
    assert "(Debian/GNU)" in (live_dir / "main.cf").read_text()
    # The settings main.cf.dist would leave empty (and so break sendmail) keep their
    # built-in values.
    assert postconf(live_dir, "-h", "setgid_group", "sendmail_path").split() == [
        "postdrop", "/usr/sbin/sendmail"]
    services = service_fields(live_dir)
    assert {"pickup/unix", "cleanup/unix", "qmgr/unix", "smtp/unix"} <= set(services)


def test_apply_is_idempotent(rendered, platform, live_dir):
    seed_debian(live_dir)
    assert apply(postconf_items(rendered), platform).changed
    before = {p.name: p.read_bytes() for p in live_dir.iterdir()}
    again = apply(postconf_items(rendered), platform)
    assert (again.changed, again.reload, again.restart) == ([], set(), set())
    assert {p.name: p.read_bytes() for p in live_dir.iterdir()} == before


def test_one_changed_setting_is_one_edit(make_config, debian12, render, platform, live_dir):
    seed_debian(live_dir)
    apply(postconf_items(render("postfix", make_config(), debian12)), platform)
    before = (live_dir / "main.cf").read_text().splitlines()
    bigger = make_config(max_message_size="50000000")
    result = apply(postconf_items(render("postfix", bigger, debian12)), platform)
    assert result.changed == [f"{live_dir}/main.cf"]
    after = (live_dir / "main.cf").read_text().splitlines()
    assert [line for line in after if line not in before] == ["message_size_limit = 50000000"]


def test_ip_protocol_change_takes_a_restart(make_config, debian12, render, platform,
                                            live_dir):
    seed_debian(live_dir)
    apply(postconf_items(render("postfix", make_config(), debian12)), platform)
    bigger = make_config(max_message_size="50000000")
    result = apply(postconf_items(render("postfix", bigger, debian12)), platform)
    assert (result.reload, result.restart) == ({"postfix"}, set())
    no_ipv6 = make_config(max_message_size="50000000", disable_ipv6="true")
    result = apply(postconf_items(render("postfix", no_ipv6, debian12)), platform)
    assert (result.reload, result.restart) == ({"postfix"}, {"postfix"})


def test_admins_settings_and_services_stay(domain_rendered, platform, live_dir):
    extra_option = "  -o smtpd_upstream_proxy_protocol=haproxy\n"
    seed_debian(live_dir, ADMIN_MAIN, ADMIN_SERVICE)
    master = live_dir / "master.cf"
    master.write_text(master.read_text().replace(
        "smtp      inet  n       -       y       -       -       smtpd\n",
        "smtp      inet  n       -       y       -       -       smtpd\n" + extra_option))
    apply(postconf_items(domain_rendered), platform)
    main = main_settings(live_dir)
    assert (main["smtpd_tls_loglevel"], main["delay_warning_time"], main["relayhost"]) == (
        "1", "4h", "[smarthost.example.net]:587")
    assert "# the admin's own settings, unrelated to chatmail" in (live_dir / "main.cf").read_text()
    fields = service_fields(live_dir)
    assert fields["2525/inet"]["command"] == "smtpd"
    params = service_params(live_dir)
    assert params["smtp/inet"]["smtpd_upstream_proxy_protocol"] == "haproxy"
    assert params["smtp/inet"]["smtpd_proxy_filter"] == "127.0.0.1:10081"
    # Debian's services we do not name keep their lines, comments included.
    assert "#  -o smtpd_tls_wrappermode=yes" in master.read_text()
    assert postfix.validate(list(domain_rendered.values()), platform) == []


def test_changed_command_keeps_the_admins_options(domain_rendered, platform, live_dir):
    seed_debian(live_dir, extra_master="authclean unix n - - - 0 cleanup -v\n"
                                       "  -o header_checks=regexp:/old\n"
                                       "  -o { cleanup_replace_stray_cr_lf = yes  }\n"
                                       "  -o { milter_header_checks = regexp:/a regexp:/b }\n")
    apply(postconf_items(domain_rendered), platform)
    assert service_fields(live_dir)["authclean/unix"]["command"].split()[0:2] == [
        "cleanup", "-o"]
    assert service_params(live_dir)["authclean/unix"] == {
        "header_checks": "regexp:/etc/postfix/submission_header_cleanup",
        "cleanup_replace_stray_cr_lf": "yes",
        "milter_header_checks": "regexp:/a regexp:/b"}
    assert postfix.validate(list(domain_rendered.values()), platform) == []


def test_upstream_relay_loses_filtermail_transport(make_config, debian12, render, platform,
                                                   live_dir):
    seed_debian(live_dir, UPSTREAM_MAIN, UPSTREAM_MASTER)
    items = postconf_items(render("postfix", make_config(), debian12))
    apply(items, platform)
    main = main_settings(live_dir)
    for key in ("default_transport", "lmtp-filtermail_initial_destination_concurrency",
                "lmtp-filtermail_destination_concurrency_limit", "virtual_mailbox_domains",
                "virtual_transport"):
        assert key not in main
    assert "lmtp-filtermail/unix" not in service_fields(live_dir)
    assert "smtpd_milters" not in service_params(live_dir)["127.0.0.1:10026/inet"]
    postconf(live_dir, "-n")
    postconf(live_dir, "-M")


def test_an_admins_own_default_transport_stays(make_config, debian12, render, platform,
                                               live_dir):
    seed_debian(live_dir, "default_transport = smtp:[smarthost.example.net]\n")
    apply(postconf_items(render("postfix", make_config(), debian12)), platform)
    assert main_settings(live_dir)["default_transport"] == "smtp:[smarthost.example.net]"


def test_becoming_an_ipv4_relay_removes_the_opendkim_milter(make_config, debian12, render,
                                                            platform, live_dir):
    seed_debian(live_dir)
    apply(postconf_items(render("postfix", make_config(), debian12)), platform)
    ipv4 = make_config("203.0.113.5", iroh_relay="")
    apply(postconf_items(render("postfix", ipv4, debian12)), platform)
    main = main_settings(live_dir)
    assert not {"non_smtpd_milters", "internal_mail_filter_classes",
                "milter_macro_daemon_name"} & set(main)
    assert "smtpd_milters" not in service_params(live_dir)["127.0.0.1:10025/inet"]
    assert main["mydestination"] == "[203.0.113.5]"
    postconf(live_dir, "-n")


# --- the plain files ---------------------------------------------------------------------------

OPENSSL_CONF = "/etc/postfix/chatmail-openssl.cnf"
# How many TLS 1.3 tickets a server context gets from OPENSSL_CONF, loaded as Postfix's
# tls_library_init loads it for a service with tls_config_name (argv[1], if given).
NUM_TICKETS = """
import ctypes, ctypes.util, sys
ssl = ctypes.CDLL(ctypes.util.find_library("ssl"))
ssl.OPENSSL_INIT_new.restype = ctypes.c_void_p
ssl.OPENSSL_INIT_set_config_appname.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
ssl.OPENSSL_init_ssl.argtypes = [ctypes.c_uint64, ctypes.c_void_p]
ssl.TLS_server_method.restype = ctypes.c_void_p
ssl.SSL_CTX_new.argtypes = [ctypes.c_void_p]
ssl.SSL_CTX_new.restype = ctypes.c_void_p
ssl.SSL_CTX_get_num_tickets.argtypes = [ctypes.c_void_p]
ssl.SSL_CTX_get_num_tickets.restype = ctypes.c_size_t
settings = ssl.OPENSSL_INIT_new()
if len(sys.argv) > 1:
    ssl.OPENSSL_INIT_set_config_appname(settings, sys.argv[1].encode())
assert ssl.OPENSSL_init_ssl(0x40, settings) == 1  # OPENSSL_INIT_LOAD_CONFIG
print(ssl.SSL_CTX_get_num_tickets(ssl.SSL_CTX_new(ssl.TLS_server_method())))
"""


def num_tickets(conf, *appname):
    proc = subprocess.run([sys.executable, "-c", NUM_TICKETS, *appname], capture_output=True,
                          text=True, env={**os.environ, "OPENSSL_CONF": str(conf)})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return int(proc.stdout)


def master_entry(master, service):
    return master.split("\n" + service + " ", 1)[1].split("\n\n", 1)[0] + "\n"


def test_tls_session_tickets_per_service(domain_rendered, tmp_path):
    """smtpd writes without TCP_NODELAY, so TLS 1.3 session tickets decide whether a small
    write waits for the peer's delayed ACK (chatmail-openssl.cnf says how).
    Port 465: none; they held smtpd's greeting back 40 ms (bench/results/relay-latency-*.md):
    Postfix's own are off, and OpenSSL's configuration under the service's
    tls_config_name sets their number to 0.
    Ports 25 and 587 (STARTTLS): one after every handshake, resumptions included, which
    acknowledges the client's TLS Finished at once (the EHLO after it waited 40-45 ms,
    bench/results/delivery-analysis.md): Postfix's own are off (OpenSSL sends none of them
    after a resumption), and the file's default part sets the number to 1.
    OpenSSL itself reads the file here, as Postfix's tls_library_init does."""
    main = domain_rendered["/etc/postfix/main.cf"].content
    environment = next(line.split("=", 1)[1].split() for line in main.splitlines()
                       if line.startswith("import_environment ="))
    assert f"OPENSSL_CONF={OPENSSL_CONF}" in environment
    assert {"MAIL_CONFIG", "MAIL_LOGTAG", "TZ", "LANG=C"} <= set(environment)
    assert "smtpd_tls_session_cache_database" not in main  # the tickets resume nothing
    master = domain_rendered["/etc/postfix/master.cf"].content
    for service in ("smtp", "submission", "smtps"):
        entry = master_entry(master, service)
        assert "\n  -o tls_session_ticket_cipher=\n" in entry, entry
    assert "tls_config_name" not in master_entry(master, "smtp")
    assert "tls_config_name" not in master_entry(master, "submission")
    [name] = [line.split("=", 1)[1] for line in master_entry(master, "smtps").splitlines()
              if line.startswith("  -o tls_config_name=")]
    conf = tmp_path / "openssl.cnf"
    conf.write_text(domain_rendered[OPENSSL_CONF].content)
    assert num_tickets("/dev/null") == 2  # OpenSSL's own number
    assert num_tickets(conf) == 1  # ports 25 and 587, and every other smtpd
    assert num_tickets(conf, name) == 0  # port 465


def test_lookup_tables(domain_rendered):
    tables = {Path(path).name: item for path, item in domain_rendered.items()
              if path.startswith("/etc/postfix/") and item.kind == "file"
              and not path.endswith(".cnf")}
    assert set(tables) == {"login_map", "submission_header_cleanup", "lmtp_header_cleanup",
                           "smtp_tls_policy_map"}
    for item in tables.values():
        assert (item.owner, item.group, item.mode, item.reload) == (
            "root", "root", 0o644, ["postfix"])
    rules = {name: [line.split(None, 1) for line in item.content.splitlines()
                    if line and not line.startswith("#")] for name, item in tables.items()}
    assert rules["login_map"] == [["/^(.*)$/", "${1}"]]
    assert rules["smtp_tls_policy_map"] == [
        ["/^\\[[^]]+\\]$/", "encrypt"], ["/^_/", "encrypt"], ["/^nauta\\.cu$/", "may"]]
    assert [rule for rule, _ in rules["lmtp_header_cleanup"]] == [
        "/^DKIM-Signature:/", "/^Authentication-Results:/", "/^Received:/"]
    assert ["/^Subject:/", "REPLACE Subject: [...]"] in [
        [rule, action.strip()] for rule, action in rules["submission_header_cleanup"]]


@pytest.mark.parametrize("header,expected", [
    ("Subject: secret plans", "REPLACE Subject: [...]"),
    ("Received: from [192.0.2.7] by chat.example.org", "IGNORE"),
    ("User-Agent: Delta Chat", "IGNORE"),
    ("From: alice@chat.example.org", ""),
])
def test_submission_header_cleanup_with_postmap(domain_rendered, tmp_path, header, expected):
    table = tmp_path / "submission_header_cleanup"
    table.write_text(domain_rendered["/etc/postfix/submission_header_cleanup"].content)
    (tmp_path / "main.cf").write_text("")
    settle(tmp_path)
    proc = subprocess.run(["/usr/sbin/postmap", "-c", str(tmp_path), "-q", header,
                           f"regexp:{table}"], capture_output=True, text=True)
    assert proc.stdout.strip() == expected


def test_mailname(rendered, relay_config):
    item = rendered["/etc/mailname"]
    assert item.content == relay_config.mail_domain + "\n"
    assert (item.kind, item.mode) == ("file", 0o644)


@pytest.mark.parametrize("platform_name,database", [("debian12", "aliases.db"),
                                                    ("alpine", "aliases.lmdb")])
def test_aliases_step_builds_the_alias_database_postfix_reads(make_config, render, live_dir,
                                                               platform_name, database):
    """`chatmail configure`'s aliases step with the real newaliases, for the main.cf our
    templates make:
    Berkeley DB on Debian, LMDB on Alpine (whose Postfix has no Berkeley DB; Debian's
    postfix-lmdb module stands in for its built-in LMDB)."""
    aliases = live_dir / "aliases"
    platform = live_platform(platform_name, live_dir, postfix_aliases=str(aliases))
    seed_debian(live_dir)
    apply(postconf_items(render("postfix", make_config(), platform)), platform)
    env = {"MAIL_CONFIG": str(live_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def run(argv, **options):
        return run_command(argv, **{**options, "env": env})

    def step():
        postfix.make_alias_database(platform, Host(run=run), print)

    step()
    assert sorted(p.name for p in live_dir.glob("aliases*")) == ["aliases", database]
    alias_maps = main_settings(live_dir)["alias_maps"]
    assert alias_maps == f"{platform.postfix_map_type}:{aliases}"

    def lookup(name):
        settle(live_dir)
        return subprocess.run(["/usr/sbin/postalias", "-c", str(live_dir), "-q", name,
                               alias_maps], capture_output=True, text=True)
    found = lookup("postmaster")
    assert (found.stdout, found.stderr) == ("root\n", "")
    # Once there, the database is the admin's: a later run does not rebuild it.
    aliases.write_text(aliases.read_text() + "abuse: root\n")
    step()
    assert lookup("abuse").returncode != 0


def test_the_default_postfix_instance_restarts_after_a_crash(domain_rendered):
    """Only the default instance: the pid file is its own (not postfix@.service's, the
    template of every postmulti instance)."""
    item = domain_rendered["/etc/systemd/system/postfix@-.service.d/chatmail.conf"]
    lines = [line for line in item.content.splitlines() if line and not line.startswith("#")]
    assert lines == ["[Service]", "PIDFile=/var/spool/postfix/pid/master.pid",
                     "Restart=always", "RestartSec=30"]
    assert item.restart == ["postfix"]


def test_on_debian_13_the_drop_in_belongs_to_postfix_service(relay_config, render):
    """Debian 13's postfix.service runs Postfix itself (no postfix@- instance)."""
    rendered = render("postfix", relay_config, load_platform("debian13"))
    dropins = [path for path in rendered if "systemd" in path]
    assert dropins == ["/etc/systemd/system/postfix.service.d/chatmail.conf"]


def test_no_systemd_drop_in_on_alpine(relay_config, render):
    rendered = render("postfix", relay_config, load_platform("alpine"))
    assert not [path for path in rendered if "systemd" in path]
    main = rendered["/etc/postfix/main.cf"].content
    assert "alias_maps = lmdb:/etc/postfix/aliases" in main
    assert "\nsmtp_tls_session_cache_database =\n" in main  # no client session cache
    # Alpine's /etc/ssl/certs has no hash links (tests/package/test_apk.py checks why)
    assert "smtp_tls_CAfile = /etc/ssl/certs/ca-certificates.crt\n" in main
    assert "smtp_tls_CApath" not in main


@pytest.mark.parametrize("platform_name,chroot", [("debian12", "y"), ("debian13", "y"),
                                                  ("alpine", "n")])
def test_public_smtpd_services_run_chrooted_only_where_the_chroot_is_provided(
        relay_config, render, platform_name, chroot):
    """Debian's postfix fills /var/spool/postfix with resolv.conf and the like; on Alpine
    nothing does, and a chrooted smtpd would wait 5 s on every client's reverse lookup."""
    rendered = render("postfix", relay_config, load_platform(platform_name))
    [master] = [item.content for item in rendered.values() if item.kind == "postconf-master"]
    services, _ = postconf_edits.parse_master(master)
    fields = {service.key: service.fields["chroot"] for service in services}
    for public in ("smtp/inet", "submission/inet", "smtps/inet"):
        assert fields[public] == chroot


# --- the rendered lists themselves -------------------------------------------------------------

def test_parse_master_reads_entries_options_and_removals():
    services, removals = postconf_edits.parse_master(
        "# comment\nfoo  unix  -  -  y  -  5  cleanup -v\n  -o a=1 -o b=\n"
        "  -o { c = x y } -o {d=z}\n!old/unix\n!foo/unix/c = 3\n")
    [service] = services
    assert (service.key, service.command, service.params) == (
        "foo/unix", "cleanup -v", {"a": "1", "b": "", "c": "x y", "d": "z"})
    assert service.entry().endswith("cleanup -v -o a=1 -o b= -o {c=x y} -o d=z")
    assert service.fields["process_limit"] == "5"
    assert removals == [("old/unix", None), ("foo/unix/c", "3")]


@pytest.mark.parametrize("text,message", [
    ("  -o a=1\n", "continuation line without a service"),
    ("foo unix - - y - 5\n", "too few fields"),
    ("foo tcp - - y - 5 smtpd\n", "unknown service type"),
    ("foo unix - - y - 5 smtpd -o novalue\n", "is not '-o name=value'"),
    ("!foo\n", "names no service/type"),
])
def test_parse_master_errors(text, message):
    with pytest.raises(postconf_edits.PostconfError, match=message):
        postconf_edits.parse_master(text)


def test_parse_main_requires_key_value():
    with pytest.raises(postconf_edits.PostconfError, match="expected 'key = value'"):
        postconf_edits.parse_main("just_a_word\n")
    assert postconf_edits.parse_main("a = 1\n!b\n!c = x y\n# d = 2\n") == (
        {"a": "1"}, {"b": None, "c": "x y"})


# --- purge: undoing our edits ------------------------------------------------------------

def replay_undo(platform, live_dir):
    """What the package's postrm does on purge: the recorded commands, newest first."""
    lines = (Path(platform.state_dir) / postfix.UNDO_FILE).read_text().splitlines()
    for line in reversed(lines):
        _, option, argument = line.split("\t", 2)
        postfix.run_postconf(live_dir, option, argument)


def test_undo_restores_the_admins_configuration(rendered, platform, live_dir):
    seed_debian(live_dir, extra_main="delay_warning_time = 4h\nmessage_size_limit = 1000\n",
                extra_master="mysvc unix - - y - - pipe\n  flags=F user=nobody argv=/bin/true\n")
    before = (postconf(live_dir, "-n"), postconf(live_dir, "-M"),
              postconf(live_dir, "-P"))
    apply(postconf_items(rendered), platform)
    apply(postconf_items(rendered), platform)  # a second run records nothing new
    assert postconf(live_dir, "-n") != before[0]
    replay_undo(platform, live_dir)
    assert (postconf(live_dir, "-n"), postconf(live_dir, "-M"),
            postconf(live_dir, "-P")) == before


def test_undo_keeps_the_first_state_across_changes(make_config, debian12, render, platform,
                                                    live_dir):
    seed_debian(live_dir)
    before = postconf(live_dir, "-n")
    apply(postconf_items(render("postfix", make_config(), debian12)), platform)
    apply(postconf_items(render("postfix", make_config(max_message_size="1000000"),
                                debian12)), platform)
    replay_undo(platform, live_dir)
    assert postconf(live_dir, "-n") == before
