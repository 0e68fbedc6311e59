"""Cheap image checks: format, size and completeness from a file's first and last bytes, without decoding.

A training run opens every image with PIL and dies at the first broken one, hours in; a check here reads
~100 bytes per image instead of decoding it, so ``ftctl dataset add`` can look at every image of a large
dataset. PNG, JPEG, GIF, WebP and BMP are read by hand (header + end marker: a truncated download is the
common failure); any other format is opened with PIL if it is installed (header only).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

# Qwen2-VL's processor refuses images whose longer side is more than 200 times the shorter one.
MAX_ASPECT_RATIO = 200


class ImageProblem(ValueError):
    """Why an image will not open; phrased for "record 12: images[0] … : <reason>"."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # png | jpeg | gif | webp | bmp | pil:<FORMAT>
    width: int
    height: int


def probe_image(path: Path) -> ImageInfo:
    """Format and size of an image file; raises ImageProblem naming what is wrong and what to do."""
    try:
        with path.open("rb") as fh:
            head = fh.read(64 * 1024)
            size = fh.seek(0, 2)
            fh.seek(max(0, size - 1024))
            tail = fh.read()
    except FileNotFoundError:
        raise ImageProblem("file not found; check the path (relative paths are read from --images DIR)") from None
    except IsADirectoryError:
        raise ImageProblem("is a directory, not an image file") from None
    except OSError as exc:
        raise ImageProblem(f"cannot be read ({exc.strerror}); check its permissions") from None
    if size == 0:
        raise ImageProblem("is empty (0 bytes); re-export the image")
    info = _sniff(head, tail) or _pil_probe(path)
    if info.width <= 0 or info.height <= 0:
        raise ImageProblem(f"has no pixels ({info.width}x{info.height}); re-export the image")
    ratio = max(info.width, info.height) / min(info.width, info.height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageProblem(
            f"is {info.width}x{info.height}, an aspect ratio over {MAX_ASPECT_RATIO} that Qwen2-VL refuses; "
            "crop or pad it"
        )
    return info


def _sniff(head: bytes, tail: bytes) -> ImageInfo | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise ImageProblem("is a PNG without its IHDR header (corrupt); re-export the image")
        width, height = struct.unpack(">II", head[16:24])
        if b"IEND" not in tail[-12:]:
            raise ImageProblem("is a truncated PNG (no IEND chunk at the end); copy or download it again")
        return ImageInfo("png", width, height)
    if head.startswith(b"\xff\xd8"):
        width, height = _jpeg_size(head)
        if b"\xff\xd9" not in tail:
            raise ImageProblem("is a truncated JPEG (no end-of-image marker); copy or download it again")
        return ImageInfo("jpeg", width, height)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack("<HH", head[6:10])
        return ImageInfo("gif", width, height)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ImageInfo("webp", *_webp_size(head))
    if head[:2] == b"BM" and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return ImageInfo("bmp", width, abs(height))  # negative height: rows stored top-down
    return None


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise ImageProblem("is a corrupt JPEG (bad marker in its header); re-export the image")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    raise ImageProblem("is a JPEG whose frame header was not found in its first 64 KiB (corrupt); re-export it")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise ImageProblem("is a WebP file of an unknown kind (corrupt?); convert it to PNG or JPEG")


def _pil_probe(path: Path) -> ImageInfo:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImageProblem("is not a PNG, JPEG, GIF, WebP or BMP image; convert it to PNG or JPEG") from None
    try:
        with Image.open(path) as img:
            return ImageInfo(f"pil:{img.format}", img.width, img.height)
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageProblem("is not an image any reader here understands; convert it to PNG or JPEG") from None
