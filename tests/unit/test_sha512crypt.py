"""SHA512-CRYPT against the specification's vectors, Python's crypt (3.11), openssl and
the real Dovecot."""

import random
import shutil
import subprocess
import warnings

import pytest

from chatmaild import sha512crypt
from chatmaild.sha512crypt import ALPHABET, crypt, make_salt, parse_setting, sha512_crypt, verify

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import crypt as stdlib_crypt  # removed in Python 3.13
    except ImportError:
        stdlib_crypt = None

needs_stdlib_crypt = pytest.mark.skipif(stdlib_crypt is None, reason="no crypt module")
needs_openssl = pytest.mark.skipif(not shutil.which("openssl"), reason="no openssl")
needs_doveadm = pytest.mark.skipif(not shutil.which("doveadm"), reason="no dovecot-core")

# From Drepper's SHA-crypt.txt, the SHA-512 test vectors whose rounds libxcrypt accepts.
SPEC_VECTORS = [
    ("$6$saltstring", "Hello world!",
     "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYE"
     "dFCoEOfaS35inz1"),
    ("$6$rounds=10000$saltstringsaltstring", "Hello world!",
     "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0"
     "Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
    ("$6$rounds=5000$toolongsaltstring", "This is just a test",
     "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZx"
     "Uhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0"),
    ("$6$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3Cm"
     "Ls66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1"),
    ("$6$rounds=77777$short", "we have a short salt string but not a short password",
     "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaU"
     "eOxFmtlcGZelFl5CxtgfiAc0"),
    ("$6$rounds=123456$asaltof16chars..", "a short string",
     "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6yc"
     "ULevoBK25fs2xXgMNrCzIMVcgEJAstJeonj1"),
]

PASSWORDS = [
    "", "a", "password", "x" * 63, "x" * 64, "x" * 65, "y" * 200, "p" * 511,
    "äöü€ unicode ✓", "日本語のパスワード", 'quo"te\\back\'slash', "tab\there", "new\nline",
    "space at end ",
]
SALTS = ["", "a", "saltstring", "./09AZaz", "0123456789abcdef", "0123456789abcdefXYZ"]


def random_password(rng):
    alphabet = [chr(c) for c in range(1, 0x250)] + ["€", "😀"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 100)))


@pytest.mark.parametrize("setting, password, expected", SPEC_VECTORS)
def test_specification_vectors(setting, password, expected):
    assert crypt(password, setting) == expected


def test_default_hash_has_random_16_char_salt_and_no_rounds_field():
    first, second = sha512_crypt("secret123"), sha512_crypt("secret123")
    assert first != second
    for hashed in (first, second):
        prefix, scheme, salt, encoded = hashed.split("$")
        assert (prefix, scheme) == ("", "6")
        assert len(salt) == 16 and set(salt) <= set(ALPHABET)
        assert len(encoded) == 86 and set(encoded) <= set(ALPHABET)
        assert verify("secret123", hashed)
        assert not verify("secret124", hashed)


def test_make_salt():
    salts = {make_salt() for _ in range(50)}
    assert len(salts) == 50
    assert all(len(salt) == 16 and set(salt) <= set(ALPHABET) for salt in salts)
    assert len(make_salt(8)) == 8


def test_explicit_rounds_are_written_into_the_hash():
    hashed = sha512_crypt("pw", "somesalt", rounds=1000)
    assert hashed.startswith("$6$rounds=1000$somesalt$")
    assert crypt("pw", hashed) == hashed
    assert sha512_crypt("pw", "somesalt", rounds=5000) != sha512_crypt("pw", "somesalt")
    assert sha512_crypt("pw", "somesalt", rounds=5000).split("$")[-1] == (
        sha512_crypt("pw", "somesalt").split("$")[-1])


def test_bytes_and_str_passwords_hash_alike():
    assert sha512_crypt("päss", "salt") == sha512_crypt("päss".encode(), "salt")


@pytest.mark.parametrize("rounds", [0, 999, 1_000_000_000, -5, "1000", 1000.0])
def test_rounds_out_of_range_are_refused(rounds):
    with pytest.raises(ValueError):
        sha512_crypt("pw", "salt", rounds=rounds)


@pytest.mark.parametrize("setting", [
    "", "$5$salt", "$1$salt", "6$salt", "$6$rounds=10$x", "$6$rounds=$salt",
    "$6$rounds=abc$salt", "$6$rounds=01000$salt", "$6$rounds=+1000$a", "$6$rounds=1000",
    "$6$rounds=1000000000$x", "$6$sa:lt", "$6$sa lt$", "$6$sä", "$6$abc\n", "$6$abc$:",
    "$6$toolongsaltstring:x",
])
def test_invalid_settings_are_refused(setting):
    with pytest.raises(ValueError):
        crypt("pw", setting)
    assert not verify("pw", setting)


def test_parse_setting():
    assert parse_setting("$6$abc") == ("abc", None)
    assert parse_setting("$6$abc$hash") == ("abc", None)
    assert parse_setting("$6$") == ("", None)
    assert parse_setting("$6$rounds=1000$") == ("", 1000)
    assert parse_setting("$6$rounds=2000$s/.$hash") == ("s/.", 2000)


@pytest.mark.parametrize("password", ["nul\x00byte", "x" * 512, "€" * 171])
def test_passwords_crypt3_refuses_raise(password):
    with pytest.raises(ValueError):
        sha512_crypt(password)
    with pytest.raises(ValueError):
        sha512crypt.check_password(password)


@pytest.mark.parametrize("salt", ["sa$lt", "sa:lt", "säl", "sa lt", b"salt"])
def test_invalid_salts_raise(salt):
    with pytest.raises(ValueError):
        sha512_crypt("pw", salt)


@needs_stdlib_crypt
@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("salt", SALTS)
def test_equals_stdlib_crypt(password, salt):
    setting = "$6$" + salt
    assert sha512_crypt(password, salt) == stdlib_crypt.crypt(password, setting)


@needs_stdlib_crypt
def test_equals_stdlib_crypt_random_and_with_rounds():
    rng = random.Random(4711)
    for index in range(60):
        password = random_password(rng)
        if len(password.encode()) > sha512crypt.MAX_PASSWORD_BYTES:
            continue
        salt = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 20)))
        setting = f"$6${salt}" if index % 3 else f"$6$rounds={rng.randrange(1000, 3000)}${salt}"
        assert crypt(password, setting) == stdlib_crypt.crypt(password, setting), setting


@needs_stdlib_crypt
def test_stdlib_crypt_refuses_what_we_refuse():
    for setting in ["$6$rounds=999$x", "$6$rounds=01000$x", "$6$sa:lt", "$6$rounds=1000"]:
        assert stdlib_crypt.crypt("pw", setting) in (None, "*0", "*1")
    assert stdlib_crypt.crypt("x" * 512, "$6$abc") in (None, "*0", "*1")


# openssl passwd cuts passwords at 256 characters and prints <NULL> for an empty one.
@needs_openssl
@pytest.mark.parametrize("password, salt", [
    ("password", "saltsalt"), ("äöü€ ✓", "0123456789abcdef"), ("z" * 256, "ab./"),
    ('q"\\\'x', "s"),
])
def test_equals_openssl_passwd(password, salt):
    result = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, password],
        capture_output=True, check=True, timeout=10,
    )
    assert result.stdout.decode().strip() == sha512_crypt(password, salt)


def doveadm_accepts(hashed, password):
    result = subprocess.run(
        ["doveadm", "-c", "/dev/null", "pw", "-t", "{SHA512-CRYPT}" + hashed, "-p", password],
        capture_output=True, text=True, timeout=10,
    )
    return result.returncode == 0 and "(verified)" in result.stdout


@needs_doveadm
@pytest.mark.parametrize("password", ["secret-password", "äöü€ ✓ 日本", 'q"\\\'x' * 5, "p" * 511])
def test_real_dovecot_verifies_our_hashes(password):
    hashed = sha512_crypt(password)
    assert doveadm_accepts(hashed, password)
    assert not doveadm_accepts(hashed, password + "x")
    assert not doveadm_accepts(hashed, password[:-1])


@needs_doveadm
def test_real_dovecot_verifies_hashes_with_rounds():
    hashed = sha512_crypt("with rounds", rounds=1234)
    assert doveadm_accepts(hashed, "with rounds")
    assert not doveadm_accepts(hashed, "with Rounds")
