"""SHA512-CRYPT (`$6$`) password hashes in pure Python.

Implements Ulrich Drepper's "Unix crypt using SHA-256 and SHA-512" specification
(https://www.akkadia.org/drepper/SHA-crypt.txt), the scheme glibc's crypt(3) and Dovecot's
SHA512-CRYPT use. We need our own because Python 3.13 removed the `crypt` module and its
replacement (`crypt-r`) is packaged neither in Debian nor in Alpine.
"""

import hashlib
import secrets

PREFIX = "$6$"
ROUNDS_PREFIX = "rounds="
DEFAULT_ROUNDS = 5000
MIN_ROUNDS = 1000
MAX_ROUNDS = 999_999_999
MAX_SALT_LENGTH = 16
# libxcrypt (Debian's crypt(3), which Dovecot checks hashes with) refuses longer
# passwords, so a hash of one could never be verified.
MAX_PASSWORD_BYTES = 511

# crypt(3)'s base64 alphabet; it is not the one of RFC 4648.
ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _make_byte_order():
    """The order in which the 64 digest bytes are taken, three at a time, for encoding.

    The specification lists 21 groups (i, i+21, i+42), each rotated left by i % 3,
    and the last byte (63) alone.
    """
    order = []
    for i in range(21):
        group = [i, i + 21, i + 42]
        shift = i % 3
        order.extend(group[shift:] + group[:shift])
    return order


_BYTE_ORDER = _make_byte_order()


def make_salt(length=MAX_SALT_LENGTH):
    """A random salt of crypt(3) characters, as glibc and Dovecot make them."""
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def sha512_crypt(password, salt=None, rounds=None):
    """Hash `password` (str or bytes) and return the `$6$...` string.

    `salt` defaults to 16 random characters; longer salts are cut to 16, as crypt(3)
    does. `rounds=None` uses the default 5000 and leaves it out of the result; an
    explicit number (1000 to 999999999) is written into the result.
    Invalid salts or rounds raise ValueError, where libxcrypt's crypt(3) returns "*0".
    """
    password = _as_bytes(password)
    if salt is None:
        salt = make_salt()
    check_salt(salt)
    salt = salt[:MAX_SALT_LENGTH]
    if rounds is None:
        spec, rounds = PREFIX, DEFAULT_ROUNDS
    else:
        check_rounds(rounds)
        spec = f"{PREFIX}{ROUNDS_PREFIX}{rounds}$"
    digest = _sha512_crypt_digest(password, salt.encode("ascii"), rounds)
    return f"{spec}{salt}${_encode(digest)}"


def crypt(password, setting):
    """crypt(3) restricted to `$6$`: hash `password` with the salt and rounds in
    `setting`, e.g. a stored hash or "$6$rounds=10000$salt"."""
    salt, rounds = parse_setting(setting)
    return sha512_crypt(password, salt, rounds)


def verify(password, hashed):
    """True if `password` matches the `$6$` hash `hashed` (constant-time compare)."""
    try:
        candidate = crypt(password, hashed)
    except ValueError:
        return False
    return secrets.compare_digest(candidate, hashed)


def parse_setting(setting):
    """Split "$6$[rounds=N$]salt[$hash]" into (salt, rounds or None).

    As strict as Debian's libxcrypt, which Dovecot uses to check hashes: rounds only
    without leading zeros and within range, and only crypt(3) base64 characters
    and '$' after the prefix. Raises ValueError otherwise.
    """
    if not isinstance(setting, str) or not setting.startswith(PREFIX):
        raise ValueError("not a SHA512-CRYPT ($6$) setting")
    rest = setting[len(PREFIX):]
    rounds = None
    if rest.startswith(ROUNDS_PREFIX):
        number, dollar, rest = rest[len(ROUNDS_PREFIX):].partition("$")
        if not dollar or not _is_plain_number(number):
            raise ValueError(f"invalid rounds in {setting!r}")
        rounds = int(number)
    if any(char not in ALPHABET and char != "$" for char in rest):
        raise ValueError(f"invalid characters in {setting!r}")
    return rest.split("$", 1)[0], rounds


def check_salt(salt):
    if not isinstance(salt, str) or any(char not in ALPHABET for char in salt):
        raise ValueError(f"salt characters must be from {ALPHABET!r}")


def check_rounds(rounds):
    if not isinstance(rounds, int) or not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be a number from {MIN_ROUNDS} to {MAX_ROUNDS}")


def _is_plain_number(text):
    """Digits without sign, spaces or leading zero."""
    return text.isascii() and text.isdigit() and not text.startswith("0")


def check_password(password):
    """Raise ValueError unless crypt(3) can hash `password` (str or bytes)."""
    _as_bytes(password)


def _as_bytes(password):
    if isinstance(password, str):
        password = password.encode("utf-8", "surrogateescape")
    if b"\x00" in password:
        # crypt(3) takes C strings and would silently cut the password here.
        raise ValueError("password contains a NUL character")
    if len(password) > MAX_PASSWORD_BYTES:
        raise ValueError(f"password is longer than {MAX_PASSWORD_BYTES} bytes")
    return password


def _repeat_to_length(block, length):
    """`block` repeated and cut to `length` bytes (the spec's "P"/"S" sequences)."""
    whole, remainder = divmod(length, len(block))
    return block * whole + block[:remainder]


def _sha512_crypt_digest(password, salt, rounds):
    sha512 = hashlib.sha512
    length = len(password)

    alternate = sha512(password + salt + password).digest()

    initial = sha512(password + salt)
    initial.update(_repeat_to_length(alternate, length))
    # Walk the bits of the password length: a 1 adds the alternate digest, a 0 the password.
    bits = length
    while bits:
        initial.update(alternate if bits & 1 else password)
        bits >>= 1
    digest = initial.digest()

    p_bytes = _repeat_to_length(_hash_repeated(password, length), length)
    s_bytes = _repeat_to_length(sha512(salt * (16 + digest[0])).digest(), len(salt))

    # The round inputs only depend on i mod 2, 3 and 7. Precomputing the fixed parts
    # keeps the loop at one hash call per round, which matters at 5000 rounds.
    prefix_suffix = [_round_parts(i, p_bytes, s_bytes) for i in range(42)]
    for i in range(rounds):
        before, after = prefix_suffix[i % 42]
        digest = sha512(before + digest + after).digest()
    return digest


def _hash_repeated(block, times):
    """SHA-512 of `block` repeated `times` times, without building a string of
    len(block) * times bytes (quadratic in the length of a password)."""
    context = hashlib.sha512()
    for _ in range(times):
        context.update(block)
    return context.digest()


def _round_parts(i, p_bytes, s_bytes):
    """The bytes fed before and after the previous digest in round `i` of the spec.

    Odd rounds put the password first and the digest last; even rounds the reverse.
    Rounds not divisible by 3 add the salt, rounds not divisible by 7 the password.
    """
    middle = (s_bytes if i % 3 else b"") + (p_bytes if i % 7 else b"")
    if i % 2:
        return p_bytes + middle, b""
    return b"", middle + p_bytes


def _encode(digest):
    """crypt(3)'s base64 of the 64 digest bytes in the specification's byte order."""
    out = []
    ordered = [digest[i] for i in _BYTE_ORDER]
    for pos in range(0, 63, 3):
        value = (ordered[pos] << 16) | (ordered[pos + 1] << 8) | ordered[pos + 2]
        out.extend(ALPHABET[(value >> shift) & 0x3F] for shift in (0, 6, 12, 18))
    last = digest[63]
    out.extend(ALPHABET[(last >> shift) & 0x3F] for shift in (0, 6))
    return "".join(out)
