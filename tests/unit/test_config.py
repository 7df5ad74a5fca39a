import pytest

from chatmaild.config import (
    ConfigError,
    check_mail_domain,
    default_config_text,
    parse_ini_params,
    parse_size_mb,
    read_config,
    set_ini_values,
)

# A chatmail.ini as upstream's `cmdeploy init` writes it (template values, comments kept).
UPSTREAM_INI = """\
[params]

# mail domain (MUST be set to fully qualified chat mail domain)
mail_domain = chat.example.org

# email sending rate per user and minute
#max_user_send_per_minute = 60
max_mailbox_size = 2G
delete_mails_after = 40
passthrough_recipients = echo@example.org
# tls_external_cert_and_key = /path/to/fullchain.pem /path/to/privkey.pem

privacy_postal =
privacy_mail = privacy@example.org
privacy_pdo =
privacy_supervisor =
"""


def test_upstream_ini_loads_unchanged(tmp_path):
    path = tmp_path / "chatmail.ini"
    path.write_text(UPSTREAM_INI)
    config = read_config(path)
    assert config.mail_domain == "chat.example.org"
    assert config.max_mailbox_size == "2G"
    assert config.max_mailbox_size_mb == 2048
    assert config.delete_mails_after == "40"
    assert config.privacy_mail == "privacy@example.org"
    assert config.privacy_postal == ""
    assert config.unknown_keys == ["passthrough_recipients"]


# Every key written as cmdeploy's own template writes it: upstream's capitalised boolean,
# trailing blanks, the keys it has since removed, postal addresses over several lines.
CMDEPLOY_INI = """\
[params]

# mail domain (MUST be set to fully qualified chat mail domain)
mail_domain = chat.example.org

max_user_send_per_minute = 60
max_user_send_burst_size = 10
max_mailbox_size = 500M
max_message_size = 31457280
delete_mails_after = 20
delete_large_after = 7
delete_inactive_users_after = 90
username_min_length = 9
username_max_length = 9
password_min_length = 9
passthrough_senders =
passthrough_recipients = echo@example.org @example.net
#www_folder = www
filtermail_smtp_port = 10080
postfix_reinject_port = 10025
filtermail_smtp_port_incoming = 10081
postfix_reinject_port_incoming = 10026
disable_ipv6 = False
acme_email = \n\
# iroh_relay =
# mtail_address = 127.0.0.1
imap_rawlog = false \n\
imap_compress = false

privacy_postal =
    Example GmbH
    Street 1, 12345 Town

privacy_mail = privacy@example.org

privacy_pdo =
    Data Officer, Example GmbH

privacy_supervisor = The Data Protection Authority of Example
"""


def test_cmdeploy_ini_loads_unchanged(tmp_path):
    path = tmp_path / "chatmail.ini"
    path.write_text(CMDEPLOY_INI)
    config = read_config(path)
    assert config.unknown_keys == ["passthrough_recipients", "passthrough_senders"]
    assert not config.disable_ipv6 and not config.imap_rawlog
    assert config.acme_email == "" and config.mtail_address is None
    assert config.privacy_postal == "Example GmbH\nStreet 1, 12345 Town"
    assert config.privacy_pdo == "Data Officer, Example GmbH"
    assert config.tls_cert_mode == "acme"


def test_defaults_match_upstream(tmp_path):
    path = tmp_path / "chatmail.ini"
    path.write_text("[params]\nmail_domain = chat.example.org\n")
    c = read_config(path)
    assert (c.max_user_send_per_minute, c.max_user_send_burst_size) == (60, 10)
    assert c.max_mailbox_size == "500M" and c.max_mailbox_size_mb == 500
    assert c.max_message_size == 31457280
    assert (c.delete_mails_after, c.delete_large_after) == ("20", "7")
    assert c.delete_inactive_users_after == 90
    assert (c.username_min_length, c.username_max_length, c.password_min_length) == (9, 9, 9)
    assert c.max_load_1m == 5.0
    assert c.min_available_memory_mb == 200 and c.min_free_disk_space_mb == 1024
    assert (c.max_imap_connections, c.max_smtp_connections) == (10000, 1000)
    assert c.filtermail_smtp_port == 10080 and c.filtermail_smtp_port_incoming == 10081
    assert c.filtermail_http_port_incoming == 10082
    assert c.filtermail_lmtp_port_transport == 10083
    assert c.postfix_reinject_port == 10025 and c.postfix_reinject_port_incoming == 10026
    assert c.mtail_address is None
    assert not c.disable_ipv6 and not c.imap_rawlog and not c.imap_compress
    assert c.turn_socket_path == "/run/chatmail-turn/turn.socket"
    # we ship no iroh-relay, so nothing is announced unless configured
    assert c.iroh_relay == "" and not c.enable_iroh_relay
    assert c.privacy_mail is None
    assert c.tls_cert_mode == "acme"
    assert c.tls_cert_path == "/etc/chatmail/tls/fullchain.pem"
    assert c.tls_key_path == "/etc/chatmail/tls/privkey.pem"
    assert str(c.mailboxes_dir) == "/home/vmail/mail/chat.example.org"
    assert str(c.passdb_path) == "/home/vmail/passdb.sqlite"
    assert c.postfix_myhostname == "chat.example.org"
    assert c.ipv4_relay is None
    assert c.unknown_keys == []


def test_ipv4_relay(make_ini):
    c = read_config(make_ini("127.0.0.1"))
    assert c.ipv4_relay == "127.0.0.1"
    assert c.mail_domain == "[127.0.0.1]"
    assert c.mail_domain_bare == "127.0.0.1"
    assert c.postfix_myhostname == "1.0.0.127.in-addr.arpa"
    assert c.tls_cert_mode == "self"
    assert c.tls_cert_path == "/etc/ssl/certs/mailserver.pem"


def test_underscore_domain_is_self_signed(make_ini):
    c = read_config(make_ini("_test.example.org"))
    assert c.tls_cert_mode == "self"
    assert c.tls_key_path == "/etc/ssl/private/mailserver.key"


def test_external_tls(make_ini):
    c = read_config(make_ini(tls_external_cert_and_key="/etc/x/full.pem /etc/x/key.pem"))
    assert (c.tls_cert_mode, c.tls_cert_path, c.tls_key_path) == (
        "external", "/etc/x/full.pem", "/etc/x/key.pem")


def test_external_tls_needs_two_paths(make_ini):
    with pytest.raises(ConfigError, match="tls_external_cert_and_key.*two paths"):
        read_config(make_ini(tls_external_cert_and_key="/etc/x/full.pem"))


def test_iroh_relay_key_present_disables_local_relay(make_ini):
    c = read_config(make_ini(iroh_relay=""))
    assert c.iroh_relay == "" and not c.enable_iroh_relay
    c = read_config(make_ini(iroh_relay="https://iroh.example.net"))
    assert c.iroh_relay == "https://iroh.example.net" and not c.enable_iroh_relay


def test_booleans_true_only_for_true(make_ini):
    assert read_config(make_ini(disable_ipv6="True")).disable_ipv6
    assert not read_config(make_ini(disable_ipv6="yes")).disable_ipv6


@pytest.mark.parametrize("key,value,expected", [
    ("max_user_send_per_minute", "lots", "whole number"),
    ("max_user_send_per_minute", "0", "greater than 0"),
    ("max_mailbox_size", "500X", "size in megabytes"),
    ("min_free_disk_space", "-1G", "size in megabytes"),
    ("max_load_1m", "high", "a number"),
    ("delete_mails_after", "20d", "number of days"),
    ("filtermail_smtp_port", "70000", "port number"),
])
def test_malformed_value_names_key_and_form(make_ini, key, value, expected):
    with pytest.raises(ConfigError) as excinfo:
        read_config(make_ini(**{key: value}))
    message = str(excinfo.value)
    assert key in message and repr(value) in message and expected in message


def test_username_lengths_must_be_consistent(make_ini):
    with pytest.raises(ConfigError, match="username_min_length"):
        read_config(make_ini(username_min_length=12, username_max_length=9))


@pytest.mark.parametrize("text,expected", [
    ("mail_domain = x.org\n", "no \\[params\\] section"),
    ("[params]\nmail_domain x.org\n", "malformed ini file"),
    ("[params]\nmail_domain = a.org\nmail_domain = b.org\n", "malformed ini file"),
    ("[params]\nmax_mailbox_size = 1G\n", "mail_domain is missing"),
])
def test_malformed_file(tmp_path, text, expected):
    path = tmp_path / "chatmail.ini"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        read_config(path)


def test_missing_file_says_how_to_create(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*chatmail setup"):
        read_config(tmp_path / "nope.ini")


@pytest.mark.parametrize("domain", [
    "chat.example.org", "_test.example.org", "127.0.0.1", "a-b.c.example", "xn--bcher-kva.de",
])
def test_valid_domains(domain):
    assert check_mail_domain(domain) is None


@pytest.mark.parametrize("domain", [
    "", "localhost", "Chat.Example.org", "chat..example.org", "-chat.example.org",
    "chat.example.org.", "ch at.example.org", "chat/../x.org", "a" * 64 + ".org",
    "chat.example.123", "chat.example.org\n", "_.example.org", "1.2.3.4.5",
])
def test_invalid_domains(domain):
    assert check_mail_domain(domain)


def test_invalid_domain_in_ini(make_ini):
    with pytest.raises(ConfigError, match="mail_domain = 'Chat.Example.org'.*lower case"):
        read_config(make_ini("Chat.Example.org"))


def test_parse_size_mb():
    assert parse_size_mb("500M") == 500
    assert parse_size_mb("2G") == 2048
    assert parse_size_mb("2gb") == 2048
    assert parse_size_mb("300") == 300


def test_values_are_raw_strings():
    params = parse_ini_params("[params]\nprivacy_postal = 50% of %(x)s\nKey = v\n")
    assert params == {"privacy_postal": "50% of %(x)s", "Key": "v"}


def test_default_config_text_roundtrip(tmp_path):
    text = default_config_text("chat.example.org", max_mailbox_size="1G", acme_email="a@b.org",
                               mailboxes_dir="/srv/mail")
    path = tmp_path / "chatmail.ini"
    path.write_text(text)
    c = read_config(path)
    assert c.max_mailbox_size == "1G" and c.acme_email == "a@b.org"
    assert str(c.mailboxes_dir) == "/srv/mail"
    assert c.unknown_keys == []
    # the commented defaults stay as documentation
    assert "#max_user_send_per_minute = 60" in text


def test_set_ini_values_keeps_admin_lines():
    text = "[params]\n# my relay\nmail_domain = a.org\nmax_mailbox_size = 1G # big\n#acme_email =\n"
    out = set_ini_values(text, {"mail_domain": "b.org", "acme_email": "x@b.org", "new": "1"})
    assert out == ("[params]\n# my relay\nmail_domain = b.org\nmax_mailbox_size = 1G # big\n"
                   "acme_email = x@b.org\nnew = 1\n")


def test_mailbox_path_refuses_hostile_names(config):
    assert config.mailbox_path("abc@chat.example.org") == config.mailboxes_dir / "abc@chat.example.org"
    for bad in ["../x@chat.example.org", "a/b@chat.example.org", "..@chat.example.org",
                "a@other.org", "a\x00b@chat.example.org", "a@chat.example.org/..",
                "a\n@chat.example.org", "nodomain", "a@b@chat.example.org"]:
        with pytest.raises(ValueError):
            config.mailbox_path(bad)


def test_explicit_tls_cert_mode(make_ini):
    assert read_config(make_ini(tls_cert_mode="self")).tls_cert_mode == "self"
    assert read_config(make_ini(tls_cert_mode="acme")).tls_cert_mode == "acme"
    c = read_config(make_ini(tls_cert_mode="external",
                             tls_external_cert_and_key="/a/full.pem /a/key.pem"))
    assert (c.tls_cert_mode, c.tls_key_path) == ("external", "/a/key.pem")


@pytest.mark.parametrize("domain,settings,expected", [
    ("chat.example.org", {"tls_cert_mode": "letsencrypt"}, "expected acme, self or external"),
    ("chat.example.org", {"tls_cert_mode": "external"}, "needs tls_external_cert_and_key"),
    ("_chat.example.org", {"tls_cert_mode": "acme"}, "cannot certify"),
    ("203.0.113.5", {"tls_cert_mode": "acme"}, "cannot certify"),
])
def test_bad_tls_cert_mode(make_ini, domain, settings, expected):
    with pytest.raises(ConfigError, match=expected):
        read_config(make_ini(domain, **settings))
