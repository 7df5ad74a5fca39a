"""SHA512-CRYPT (`$6$`) password hashes from the system's crypt(3).

Dovecot checks the {SHA512-CRYPT} hashes doveauth stores with the system's crypt(3), so
we make them with the same library instead of implementing the scheme ourselves. Python
3.13 removed the `crypt` module, hence ctypes: libxcrypt's libcrypt.so.1 on Debian,
musl's libc, which has crypt_r built in, on Alpine.
"""

import ctypes

PREFIX = "$6$"
# crypt(3)'s base64 alphabet; it is not the one of RFC 4648.
ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SALT_LENGTH = 16
# sizeof(struct crypt_data) in libxcrypt's crypt.h; musl's is smaller.
CRYPT_DATA_SIZE = 32768
# CRYPT_GENSALT_OUTPUT_SIZE in libxcrypt's crypt.h.
GENSALT_OUTPUT_SIZE = 192
# The cheapest setting: enough to learn whether crypt(3) accepts a password.
PROBE_SETTING = PREFIX + "rounds=1000$probe"

LIBXCRYPT = "libcrypt.so.1"


def sha512_crypt(password):
    """A new `$6$` hash of `password` (str or bytes): a random 16-character salt and
    5000 rounds, which crypt(3) and Dovecot write without a rounds= field."""
    return crypt(password, _new_setting())


def crypt(password, setting):
    """crypt(3) restricted to `$6$`: hash `password` with the salt and rounds of
    `setting`, e.g. a stored hash or "$6$rounds=10000$salt".

    Raises ValueError for what crypt(3) refuses (a malformed setting, a password too
    long for it) and for NUL characters, where crypt(3) would silently stop reading.
    """
    if not isinstance(setting, str) or not setting.startswith(PREFIX):
        raise ValueError("not a SHA512-CRYPT ($6$) setting")
    return _crypt_r(_as_bytes(password), _c_string(setting.encode("ascii")))


def verify(password, hashed):
    """True if `password` matches the `$6$` hash `hashed` (constant-time compare)."""
    try:
        candidate = crypt(password, hashed)
    except ValueError:
        return False
    # Imported here, as secrets below: doveauth only makes hashes (Dovecot checks them),
    # and hmac loads OpenSSL's libcrypto, 3.5 MB of doveauth's memory (bench/README.md).
    import hmac

    return hmac.compare_digest(candidate, hashed)


def check_password(password):
    """Raise ValueError unless crypt(3), which Dovecot checks hashes with, can hash
    `password` (str or bytes).

    Asking the library keeps its limits in one place: libxcrypt takes up to 511 bytes,
    musl up to 256.
    """
    crypt(password, PROBE_SETTING)


def _as_bytes(password):
    if isinstance(password, str):
        password = password.encode("utf-8", "surrogateescape")
    return _c_string(password)


def _c_string(data):
    if b"\x00" in data:
        raise ValueError("NUL character in a crypt(3) argument")
    return data


def _setting_from_secrets():
    """A new setting for C libraries without crypt_gensalt (musl), like libxcrypt's."""
    import secrets  # only on musl; it imports hmac (see verify)

    return PREFIX + "".join(secrets.choice(ALPHABET) for _ in range(SALT_LENGTH))


def _load_library():
    """libxcrypt if installed, else the process's C library, if either has crypt_r."""
    for name in (LIBXCRYPT, None):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        if hasattr(library, "crypt_r"):
            return library
    raise ImportError(
        f"SHA512-CRYPT needs crypt_r: install libxcrypt ({LIBXCRYPT}, Debian's libcrypt1)"
        " or use a C library that has it (musl)"
    )


def _bind_crypt_r(library):
    function = library.crypt_r
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    function.restype = ctypes.c_char_p

    def crypt_r(password, setting):
        # A buffer per call keeps concurrent threads apart; ctypes releases the GIL
        # during the call, so they really hash in parallel. Zeroed, as crypt_r wants.
        data = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
        hashed = function(password, setting, data)
        # Failure is NULL or, in libxcrypt and musl, a string starting with "*".
        if not hashed or hashed.startswith(b"*"):
            raise ValueError("crypt(3) refused the password or setting")
        return hashed.decode("ascii")

    return crypt_r


def _bind_gensalt(library):
    """libxcrypt's own salt maker, else (musl) ours."""
    function = getattr(library, "crypt_gensalt_rn", None)
    if function is None:
        return _setting_from_secrets
    function.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int,
                         ctypes.c_char_p, ctypes.c_int]
    function.restype = ctypes.c_char_p

    def setting_from_gensalt():
        output = ctypes.create_string_buffer(GENSALT_OUTPUT_SIZE)
        # Count 0 means the default 5000 rounds; no random bytes given means libxcrypt
        # takes them from the kernel.
        if not function(PREFIX.encode(), 0, None, 0, output, len(output)):
            raise OSError("crypt_gensalt_rn failed")
        return output.value.decode("ascii")

    return setting_from_gensalt


_library = _load_library()
_crypt_r = _bind_crypt_r(_library)
_new_setting = _bind_gensalt(_library)
