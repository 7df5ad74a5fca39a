"""SHA512-CRYPT through the system's crypt(3), against the specification's vectors,
Python's crypt module (3.11, same library through CPython's binding), openssl's own
implementation and the real Dovecot."""

import concurrent.futures
import random
import shutil
import subprocess
import types
import warnings

import pytest

from chatmaild import sha512crypt
from chatmaild.sha512crypt import ALPHABET, check_password, crypt, sha512_crypt, verify

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
# The specification's rounds=10 vector: its reference code raises the rounds to 1000,
# libxcrypt (and so Dovecot) refuses the setting.
SPEC_ROUNDS_10 = ("$6$rounds=10$roundstoolow", "the minimum number is still observed")

PASSWORDS = [
    "", "a", "password", "x" * 63, "x" * 64, "x" * 65, "y" * 200, "p" * 511,
    "äöü€ unicode ✓", "日本語のパスワード", 'quo"te\\back\'slash', "tab\there", "new\nline",
    "space at end ",
]
SALTS = ["", "a", "saltstring", "./09AZaz", "0123456789abcdef", "0123456789abcdefXYZ"]

# Settings libxcrypt refuses itself.
LIBRARY_REFUSED_SETTINGS = [
    "", "6$salt", "*0", "$6$rounds=10$x", "$6$rounds=$salt", "$6$rounds=abc$salt",
    "$6$rounds=01000$salt", "$6$rounds=+1000$a", "$6$rounds=1000", "$6$rounds=0$salt",
    "$6$rounds=999$salt", "$6$rounds=-5$salt", "$6$rounds=1000000000$x", "$6$sa:lt",
    "$6$sa lt$", "$6$sä", "$6$abc\n", "$6$abc$:", "$6$toolongsaltstring:x",
]
# Other schemes, and what cannot reach crypt(3) as a C string.
INVALID_SETTINGS = LIBRARY_REFUSED_SETTINGS + [
    "$5$salt", "$1$salt", "$6$sa\x00lt", None, b"$6$salt",
]
REFUSED_PASSWORDS = ["nul\x00byte", b"nul\x00byte", "x" * 512, "€" * 171]


def random_password(rng):
    alphabet = [chr(c) for c in range(1, 0x250)] + ["€", "😀"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 100)))


def random_setting(rng, index):
    salt = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 20)))
    return f"$6${salt}" if index % 3 else f"$6$rounds={rng.randrange(1000, 3000)}${salt}"


def assert_fresh_setting(setting):
    """What crypt(3) and Dovecot make by default: 16 salt characters, no rounds field."""
    prefix, scheme, salt = setting.split("$")
    assert (prefix, scheme) == ("", "6")
    assert len(salt) == 16 and set(salt) <= set(ALPHABET)


@pytest.mark.parametrize("setting, password, expected", SPEC_VECTORS)
def test_specification_vectors(setting, password, expected):
    assert crypt(password, setting) == expected
    assert crypt(password, expected) == expected
    assert verify(password, expected)
    assert not verify(password + " ", expected)


def test_specification_rounds_below_minimum_are_refused():
    setting, password = SPEC_ROUNDS_10
    with pytest.raises(ValueError):
        crypt(password, setting)


def test_default_hash_has_random_16_char_salt_and_no_rounds_field():
    first, second = sha512_crypt("secret123"), sha512_crypt("secret123")
    assert first != second
    for hashed in (first, second):
        setting, _, encoded = hashed.rpartition("$")
        assert_fresh_setting(setting)
        assert len(encoded) == 86 and set(encoded) <= set(ALPHABET)
        assert verify("secret123", hashed)
        assert not verify("secret124", hashed)


@pytest.mark.parametrize("new_setting", [
    sha512crypt._new_setting, sha512crypt._setting_from_secrets,
])
def test_new_settings_from_library_and_secrets_look_alike(new_setting):
    settings = {new_setting() for _ in range(50)}
    assert len(settings) == 50
    for setting in settings:
        assert_fresh_setting(setting)
        assert verify("pw", crypt("pw", setting))


def test_this_system_uses_libxcrypt_gensalt():
    # Debian: the salt comes from libxcrypt; musl would fall back to secrets.
    assert sha512crypt._new_setting is not sha512crypt._setting_from_secrets


def test_explicit_rounds_are_kept_in_the_hash():
    hashed = crypt("pw", "$6$rounds=1000$somesalt")
    assert hashed.startswith("$6$rounds=1000$somesalt$")
    assert crypt("pw", hashed) == hashed
    explicit_default = crypt("pw", "$6$rounds=5000$somesalt")
    implicit_default = crypt("pw", "$6$somesalt")
    assert explicit_default != implicit_default
    assert explicit_default.split("$")[-1] == implicit_default.split("$")[-1]


def test_salt_is_cut_to_16_characters():
    assert crypt("pw", "$6$0123456789abcdefXYZ") == crypt("pw", "$6$0123456789abcdef")


def test_bytes_and_str_passwords_hash_alike():
    assert crypt("päss", "$6$salt") == crypt("päss".encode(), "$6$salt")


@pytest.mark.parametrize("setting", INVALID_SETTINGS)
def test_invalid_settings_are_refused(setting):
    with pytest.raises(ValueError):
        crypt("pw", setting)
    assert not verify("pw", setting)


def test_malformed_stored_hashes_are_refused():
    password = "correct horse"
    hashed = sha512_crypt(password)
    last = hashed[-1]
    for malformed in [
        hashed[:-1], hashed + "x", hashed[:-1] + ("a" if last != "a" else "b"),
        "{SHA512-CRYPT}" + hashed, hashed.upper(), hashed + "\n", " " + hashed,
        hashed.rpartition("$")[0], hashed.rpartition("$")[0] + "$", hashed.replace("$", ":"),
    ]:
        assert not verify(password, malformed), malformed
    assert verify(password, hashed)


@pytest.mark.parametrize("password", REFUSED_PASSWORDS)
def test_passwords_crypt3_refuses_raise(password):
    with pytest.raises(ValueError):
        sha512_crypt(password)
    with pytest.raises(ValueError):
        check_password(password)


@pytest.mark.parametrize("password", ["", "a", "p" * 511, "€" * 170, b"\xff\xfe"])
def test_check_password_accepts_what_crypt3_hashes(password):
    check_password(password)
    assert verify(password, sha512_crypt(password))


@pytest.mark.parametrize("result", [None, b"*0", b"*1", b"*"])
def test_library_failures_raise_and_never_match(result, monkeypatch):
    def failing_crypt_r(password, setting, data):
        return result

    crypt_r = sha512crypt._bind_crypt_r(types.SimpleNamespace(crypt_r=failing_crypt_r))
    with pytest.raises(ValueError):
        crypt_r(b"pw", b"$6$salt")
    monkeypatch.setattr(sha512crypt, "_crypt_r", crypt_r)
    assert not verify("pw", "$6$salt$" + "A" * 86)
    with pytest.raises(ValueError):
        sha512_crypt("pw")


def fake_cdll(libraries):
    """A ctypes.CDLL stand-in: `libraries` maps a name (None: the process) to its
    symbols; other names fail to load."""
    def cdll(name):
        if name not in libraries:
            raise OSError(f"{name}: cannot open shared object file")
        return types.SimpleNamespace(**libraries[name])
    return cdll


def test_loader_prefers_libxcrypt(monkeypatch):
    monkeypatch.setattr(sha512crypt.ctypes, "CDLL", fake_cdll(
        {"libcrypt.so.1": {"crypt_r": "xcrypt"}, None: {"crypt_r": "libc"}}))
    assert sha512crypt._load_library().crypt_r == "xcrypt"


def test_loader_falls_back_to_the_c_library_as_on_musl(monkeypatch):
    monkeypatch.setattr(sha512crypt.ctypes, "CDLL", fake_cdll({None: {"crypt_r": "musl"}}))
    library = sha512crypt._load_library()
    assert library.crypt_r == "musl"
    assert sha512crypt._bind_gensalt(library) is sha512crypt._setting_from_secrets


@pytest.mark.parametrize("libraries", [{}, {None: {}}, {"libcrypt.so.1": {}, None: {}}])
def test_loader_names_what_is_missing(libraries, monkeypatch):
    monkeypatch.setattr(sha512crypt.ctypes, "CDLL", fake_cdll(libraries))
    with pytest.raises(ImportError, match=r"crypt_r.*libcrypt\.so\.1.*libcrypt1.*musl"):
        sha512crypt._load_library()


def test_many_threads_hash_correctly_at_once():
    rng = random.Random(1234)
    cases = [(random_password(rng), random_setting(rng, index)) for index in range(60)]
    cases += [(password, setting) for setting, password, _ in SPEC_VECTORS[:4]] * 10
    expected = [crypt(password, setting) for password, setting in cases]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda case: crypt(*case), cases))
        fresh = list(pool.map(sha512_crypt, [f"pw{i}" for i in range(100)]))
    assert results == expected
    assert results[60:64] == [hashed for _, _, hashed in SPEC_VECTORS[:4]]
    assert len({hashed.rpartition("$")[0] for hashed in fresh}) == 100
    assert all(verify(f"pw{i}", hashed) for i, hashed in enumerate(fresh))


@needs_stdlib_crypt
@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("salt", SALTS)
def test_equals_stdlib_crypt(password, salt):
    setting = "$6$" + salt
    assert crypt(password, setting) == stdlib_crypt.crypt(password, setting)


@needs_stdlib_crypt
def test_equals_stdlib_crypt_random_and_with_rounds():
    rng = random.Random(4711)
    for index in range(60):
        password, setting = random_password(rng), random_setting(rng, index)
        assert crypt(password, setting) == stdlib_crypt.crypt(password, setting), setting


@needs_stdlib_crypt
def test_stdlib_crypt_refuses_what_we_refuse():
    for setting in LIBRARY_REFUSED_SETTINGS:
        assert stdlib_crypt.crypt("pw", setting) in (None, "*0", "*1"), setting
    assert stdlib_crypt.crypt("x" * 512, "$6$abc") in (None, "*0", "*1")


def openssl_passwd(password, salt):
    result = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, password],
        capture_output=True, check=True, timeout=10,
    )
    return result.stdout.decode().strip()


# openssl passwd cuts passwords at 256 characters and prints <NULL> for an empty one.
@needs_openssl
@pytest.mark.parametrize("password, salt", [
    ("password", "saltsalt"), ("äöü€ ✓", "0123456789abcdef"), ("z" * 256, "ab./"),
    ('q"\\\'x', "s"),
])
def test_equals_openssl_passwd(password, salt):
    assert openssl_passwd(password, salt) == crypt(password, "$6$" + salt)


@needs_openssl
def test_equals_openssl_passwd_random():
    rng = random.Random(815)
    for _ in range(20):
        password = random_password(rng).replace("\n", "") or "x"
        salt = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 17)))
        assert openssl_passwd(password, salt) == crypt(password, "$6$" + salt), password


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
def test_real_dovecot_verifies_hashes_with_rounds_and_secrets_salt():
    hashed = crypt("with rounds", "$6$rounds=1234$" + sha512crypt._setting_from_secrets()[3:])
    assert doveadm_accepts(hashed, "with rounds")
    assert not doveadm_accepts(hashed, "with Rounds")
    hashed = crypt("musl salt", sha512crypt._setting_from_secrets())
    assert doveadm_accepts(hashed, "musl salt")
    assert not doveadm_accepts(hashed, "musl salT")
