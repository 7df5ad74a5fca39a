"""Reading apk v2 packages and indexes back, independently of alpine/mkapk.py's writer:
split the gzip streams, parse the tars, verify signatures with openssl."""

import io
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass

CHECKSUM_PAX_KEY = "APK-TOOLS.checksum.SHA1"


def gzip_streams(data):
    """[(compressed bytes, decompressed bytes)] of each concatenated gzip member."""
    streams = []
    rest = data
    while rest:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        plain = decompressor.decompress(rest) + decompressor.flush()
        assert decompressor.eof, "truncated gzip stream"
        used = len(rest) - len(decompressor.unused_data)
        streams.append((rest[:used], plain))
        rest = decompressor.unused_data
    return streams


def tar_members(plain):
    """[(TarInfo, content bytes or None)] of a tar, which may lack its end blocks."""
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]


def ends_with_end_of_archive(plain):
    return len(plain) >= 1024 and plain[-1024:] == bytes(1024)


def parse_pkginfo(text):
    """.PKGINFO -> {key: [values]} (depend, provides ... repeat)."""
    fields = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" = ")
        fields.setdefault(key, []).append(value)
    return fields


def parse_apkindex(text):
    """APKINDEX -> [{letter: value}], one per package stanza."""
    stanzas = []
    for block in text.split("\n\n"):
        if block.strip():
            stanzas.append(dict(line.split(":", 1) for line in block.splitlines()))
    return stanzas


def openssl_verify(public_key, signature, data):
    """True when SIGNATURE is PUBLIC_KEY's RSA/SHA1 signature of DATA."""
    with tempfile.NamedTemporaryFile() as sig, tempfile.NamedTemporaryFile() as signed:
        sig.write(signature)
        sig.flush()
        signed.write(data)
        signed.flush()
        result = subprocess.run(["openssl", "dgst", "-sha1", "-verify", str(public_key),
                                 "-signature", sig.name, signed.name], capture_output=True)
    return result.returncode == 0


@dataclass
class Apk:
    """A package's three streams and what they hold."""
    signature_stream: tuple
    control_stream: tuple
    data_stream: tuple
    signature_name: str
    signature: bytes
    pkginfo: dict
    scripts: dict
    data: list

    @property
    def files(self):
        """Installed paths (absolute) of everything in the data tar, directories included."""
        return {"/" + info.name.rstrip("/") for info, _ in self.data}


def read_apk(path):
    streams = gzip_streams(path.read_bytes())
    assert len(streams) == 3, f"{path}: {len(streams)} gzip streams, not 3"
    signature_stream, control_stream, data_stream = streams
    (sig_info, signature), = tar_members(signature_stream[1])
    control = tar_members(control_stream[1])
    pkginfo = [content for info, content in control if info.name == ".PKGINFO"]
    assert pkginfo, f"{path}: no .PKGINFO"
    scripts = {info.name: content for info, content in control if info.name != ".PKGINFO"}
    return Apk(signature_stream, control_stream, data_stream, sig_info.name, signature,
               parse_pkginfo(pkginfo[0].decode()), scripts, tar_members(data_stream[1]))


def read_index(path):
    """(signature name, signature, signed index stream, {name: content})."""
    streams = gzip_streams(path.read_bytes())
    assert len(streams) == 2, f"{path}: {len(streams)} gzip streams, not 2"
    (sig_info, signature), = tar_members(streams[0][1])
    contents = {info.name: content for info, content in tar_members(streams[1][1])}
    return sig_info.name, signature, streams[1][0], contents
