"""www: the invite QR code, and checks of the files clients parse.

A target of kind "qrcode" renders the text the code says; apply() draws it as a PNG with
python3-qrcode and installs it through chatmaild.admin.apply, so the image is hash-tracked like
every other generated file (an image the admin replaced is kept).
"""

import importlib.util
import io
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

from ..apply import ApplyResult, GeneratedFiles, apply_file

QRCODE = "qrcode"
# Scaled for a 300 px wide image on the page; H-level error correction survives a scuffed
# printout, as upstream's invite codes do.
QR_BOX_SIZE = 8
QR_BORDER = 4


def qr_png(text):
    """A PNG image of a QR code saying `text`. Drawn by qrcode's pure-Python PNG writer
    (python3-png, a dependency of ours: Debian 13's python3-qrcode no longer depends on
    it): the same text always gives the same bytes, so an unchanged code is never
    rewritten."""
    import qrcode
    import qrcode.image.pure

    code = qrcode.QRCode(
        error_correction=qrcode.constants.ERROR_CORRECT_H,
        box_size=QR_BOX_SIZE,
        border=QR_BORDER,
        image_factory=qrcode.image.pure.PyPNGImage,
    )
    code.add_data(text)
    code.make(fit=True)
    output = io.BytesIO()
    code.make_image().save(output)
    return output.getvalue()


def apply(files, platform, root="/"):
    """Draw and install the QR code targets below `root`; returns an ApplyResult."""
    record = GeneratedFiles(Path(root) / platform.state_dir.lstrip("/"))
    result = ApplyResult()
    try:
        for item in files:
            if item.kind == QRCODE:
                image = qr_png(item.content.strip())
                result.merge(apply_file(replace(item, content=image, kind="file"), record, root))
    finally:
        record.save()
    return result


def validate(files, platform):
    """Problems with the pages clients read; empty list: none."""
    problems = []
    for item in files:
        if item.kind == QRCODE:
            problems += qr_problems(item)
        elif item.path.endswith(".xml"):
            problems += xml_problems(item)
    return problems


def qr_problems(item):
    if importlib.util.find_spec("qrcode") is None:
        return [f"{item.path}: python3-qrcode is not installed"]
    if not item.content.strip() or "\n" in item.content.strip():
        return [f"{item.path}: the QR code text must be one line, not {item.content!r}"]
    return []


def xml_problems(item):
    try:
        ET.fromstring(item.content.encode("utf-8"))
    except ET.ParseError as exc:
        return [f"{item.path}: not well-formed XML: {exc}"]
    return []
