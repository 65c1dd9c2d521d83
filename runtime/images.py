"""Images for a vision model: checked before onnxruntime-genai decodes them, and what they cost.

og's image processor decodes a file in native code into a full RGB copy (and an RGBA
working copy) before it shrinks it, so a file that lies about its size — a PNG that
claims 100,000 × 100,000 pixels in a few kilobytes, a truncated download — must be
refused here, from its headers, in pure Python. ``load_image`` reads PNG and JPEG (what
og's decoder reads on every platform), walks the whole file structure (PNG chunks and
their CRCs up to ``IEND``; JPEG segments up to the image data and its end marker) and
caps the pixel count; anything else is a ``BadImage`` with one clear line.

``image_tokens`` is what an image costs in the prompt for a Phi-3(.5)-vision model: og's
``Phi3ImageTransform`` resizes it into a grid of at most ``MAX_CROPS`` crops of 336×336
pixels (keeping the aspect ratio, padding with white) and the model spends 144 features
on each crop and on a global view, plus one separator per row and one between the two.
The memory planner and the engine use it to refuse an image that cannot fit the context
before anything is decoded.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from edgephi.core.errors import BadImage

CROP = 336
MAX_CROPS = 16
TOKENS_PER_CROP = 144
ROW_TOKENS = 12  # sqrt(144): one separator feature closes each row of 12
MAX_PIXELS = 64 * 2**20  # 67 megapixels: above any phone camera, far below a decompression bomb
MAX_FILE_BYTES = 256 * 2**20

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless; not DHT/JPG/DAC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class Image:
    """A checked image: its encoded bytes and what its header says."""

    data: bytes
    format: str  # "png" or "jpeg"
    width: int
    height: int
    name: str = "image"

    @property
    def tokens(self) -> int:
        return image_tokens(self.width, self.height)


def hd_grid(width: int, height: int, max_crops: int = MAX_CROPS) -> tuple[int, int]:
    """Rows and columns of 336-pixel crops og's HD transform cuts an image into."""
    long_side, short_side = max(width, height), min(width, height)
    ratio = long_side / short_side
    scale = 1
    while scale * math.ceil(scale / ratio) <= max_crops:
        scale += 1
    scale -= 1
    new_long = scale * CROP
    new_short = int(new_long / ratio)
    if new_short < 1:
        raise BadImage(f"the image is {width}x{height} pixels, too long and thin to look at")
    along, across = scale, math.ceil(new_short / CROP)  # crops along the long side, across the short
    return (along, across) if height > width else (across, along)


def image_tokens(width: int, height: int) -> int:
    """Prompt tokens a ``width`` × ``height`` image takes in a Phi-3(.5)-vision model."""
    return _grid_tokens(*hd_grid(width, height))


def max_image_tokens() -> int:
    """The most one image can cost: 16 crops in one column (16 separators in the sub-image)."""
    return _grid_tokens(MAX_CROPS, 1)


def _grid_tokens(rows: int, cols: int) -> int:
    # 144 per crop and per global view, a separator closing each row of both, one between them.
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * ROW_TOKENS


def load_image(source: str | Path | bytes, name: str | None = None) -> Image:
    """Read and check an image file (or its bytes); raise ``BadImage`` if it is unusable."""
    if isinstance(source, bytes):
        data, label = source, name or "the image"
    else:
        path = Path(source)
        label = name or str(path)
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise BadImage(
                    f"{label} is {size} bytes, over the {MAX_FILE_BYTES >> 20} MiB an image may be"
                )
            data = path.read_bytes()
        except IsADirectoryError:
            raise BadImage(f"{label} is a folder, not an image") from None
        except FileNotFoundError:
            raise BadImage(f"{label} does not exist", hint="check the path of --image") from None
        except OSError as exc:
            raise BadImage(f"cannot read {label}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise BadImage(f"{label} is {len(data)} bytes, over the {MAX_FILE_BYTES >> 20} MiB an image may be")
    if data.startswith(_PNG_SIGNATURE):
        fmt, (width, height) = "png", _png_size(data, label)
    elif data.startswith(b"\xff\xd8\xff"):
        fmt, (width, height) = "jpeg", _jpeg_size(data, label)
    else:
        raise BadImage(f"{label} is not a PNG or JPEG image")
    if width < 1 or height < 1:
        raise BadImage(f"{label} claims to be {width}x{height} pixels, which is empty")
    if width * height > MAX_PIXELS:
        raise BadImage(
            f"{label} claims {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), over the "
            f"{MAX_PIXELS / 1e6:.0f} megapixels decoded safely on a device; it may be a decompression bomb",
            hint="downscale the picture first",
        )
    hd_grid(width, height)  # refuses shapes the transform cannot resize
    return Image(data, fmt, width, height, label)


def _png_size(data: bytes, label: str) -> tuple[int, int]:
    pos, size, seen_data = len(_PNG_SIGNATURE), None, False
    while True:
        if pos + 8 > len(data):
            raise BadImage(f"{label} is a truncated PNG (it ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise BadImage(f"{label} is a truncated PNG (its {kind.decode('latin-1')!r} chunk is cut short)")
        if zlib.crc32(data[pos + 4 : end - 4]) != struct.unpack(">I", data[end - 4 : end])[0]:
            raise BadImage(f"{label} is a corrupt PNG (the {kind.decode('latin-1')!r} chunk fails its CRC)")
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise BadImage(f"{label} is a corrupt PNG (it does not start with an IHDR chunk)")
            size = struct.unpack(">II", data[pos + 8 : pos + 16])
        elif kind == b"IDAT":
            seen_data = True
        elif kind == b"IEND":
            if not seen_data:
                raise BadImage(f"{label} is a PNG without image data")
            return size[0], size[1]
        pos = end


def _jpeg_size(data: bytes, label: str) -> tuple[int, int]:
    pos, size = 2, None
    while True:
        if pos + 4 > len(data):
            raise BadImage(f"{label} is a truncated JPEG (it ends inside its headers)")
        if data[pos] != 0xFF:
            raise BadImage(f"{label} is a corrupt JPEG (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2 or pos + 2 + length > len(data):
            raise BadImage(f"{label} is a truncated JPEG (a header segment is cut short)")
        if marker in _SOF:
            if length < 7:
                raise BadImage(f"{label} is a corrupt JPEG (its frame header is too short)")
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                raise BadImage(f"{label} is a corrupt JPEG (image data before any frame header)")
            # 0xFF is byte-stuffed inside the scan data, so the end marker cannot occur there.
            if data.rfind(b"\xff\xd9") < pos + 2 + length:
                raise BadImage(f"{label} is a truncated JPEG (it has no end-of-image marker)")
            if size[1] == 0:
                raise BadImage(f"{label} is a JPEG whose height is set later (DNL), which is not supported")
            return size
        pos += 2 + length


def png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (``width`` × ``height`` × 3 bytes, row by row)."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"{len(rgb)} bytes are not {width}x{height} RGB pixels")
    rows = b"".join(b"\x00" + rgb[y * width * 3 : (y + 1) * width * 3] for y in range(height))
    return png_from_idat(width, height, zlib.compress(rows))


def png_from_idat(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit RGB PNG around already compressed image data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
