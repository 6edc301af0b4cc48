"""Decode one image from whatever a data set stores into an upright RGB PIL image, or say precisely why not.

Sources: raw bytes, a `{"bytes": ..., "path": ...}` struct (how `datasets`/parquet store Image features), a path
(absolute or relative to the data file), a `file://` URL, a `data:` URL, or an already decoded PIL image.

Every failure raises `ImageSkipped(reason, where)` with one of `REASONS`; readers and datasets catch it, count it in a
`Tally` with the file/row it came from, and move on, so one bad file never ends a run.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = ("missing", "corrupt", "truncated", "too_large", "too_small", "remote_url", "unreadable")


class ImageSkipped(Exception):
    """An image that cannot be used; `reason` is one of REASONS, `where` names the file or the row's field."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        self.reason, self.where, self.detail = reason, where, detail
        super().__init__(f"image {reason}: {where}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class ImagePolicy:
    """Limits applied to every decoded image.

    `max_pixels` guards against decompression bombs (checked from the header, before any pixel is decoded);
    `min_side` rejects degenerate images such as 1×1 tracking pixels.
    """

    max_pixels: int = 64_000_000
    min_side: int = 8


DEFAULT_POLICY = ImagePolicy()


def _read_source(source, base_dir: Path | None) -> tuple[bytes | Image.Image, str]:
    """The encoded bytes (or a PIL image) and a short name of where they came from."""
    if isinstance(source, Image.Image):
        return source, "<PIL image>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data:
            return bytes(data), path or "<bytes>"
        if path:
            return _read_source(path, base_dir)
        raise ImageSkipped("missing", "<struct>", "neither bytes nor path")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise ImageSkipped("unreadable", repr(type(source).__name__), "unsupported image value")
    if source.startswith("data:"):
        try:
            header, payload = source.split(",", 1)
            data = base64.b64decode(payload) if ";base64" in header else unquote(payload).encode("latin-1")
        except (ValueError, binascii.Error) as err:
            raise ImageSkipped("corrupt", "data URL", str(err)) from err
        return data, "data URL"
    if source.startswith(("http://", "https://")):
        raise ImageSkipped("remote_url", source, "download remote images first; only local files are read")
    path = Path(unquote(urlparse(source).path)) if source.startswith("file://") else Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError as err:
        raise ImageSkipped("missing", str(path)) from err
    except OSError as err:
        raise ImageSkipped("unreadable", str(path), err.strerror or str(err)) from err


def _sixteen_bit_to_8(image: Image.Image) -> Image.Image:
    # PIL's convert() clips 16-bit and float values at 255 (a white image); rescale the range instead.
    array = np.asarray(image)
    if image.mode == "F":
        scale = 255.0 if float(array.max(initial=0.0)) <= 1.0 else 1.0
        return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L")
    peak = int(array.max(initial=0))
    divisor = 257.0 if peak > 255 else 1.0
    return Image.fromarray(np.clip(array / divisor, 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: transparency composited on white, 16-bit/float rescaled, CMYK/LAB/YCbCr converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _sixteen_bit_to_8(image).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _reason(err: Exception) -> str:
    return "truncated" if "truncated" in str(err).lower() else "corrupt"


def decode_image(data: bytes | Image.Image, where: str = "<bytes>",
                 policy: ImagePolicy = DEFAULT_POLICY) -> Image.Image:
    """Encoded bytes → upright RGB image within the policy's limits (raises ImageSkipped)."""
    if isinstance(data, Image.Image):
        image = data
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ImageSkipped("too_large", where, str(err)) from err
        except UnidentifiedImageError as err:
            raise ImageSkipped("corrupt", where, "not a recognised image format") from err
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageSkipped(_reason(err), where, str(err)) from err
    width, height = image.size
    if width * height > policy.max_pixels:
        raise ImageSkipped("too_large", where, f"{width}x{height} is over the {policy.max_pixels} pixel limit")
    if min(width, height) < policy.min_side:
        raise ImageSkipped("too_small", where, f"{width}x{height} is under the {policy.min_side} px minimum side")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
    except Image.DecompressionBombError as err:
        raise ImageSkipped("too_large", where, str(err)) from err
    except OSError as err:
        raise ImageSkipped(_reason(err), where, str(err)) from err
    except (ValueError, SyntaxError, IndexError, struct.error) as err:  # broken headers surface as these
        raise ImageSkipped("corrupt", where, str(err)) from err
    return image


def load_image(source, base_dir: str | Path | None = None, policy: ImagePolicy = DEFAULT_POLICY) -> Image.Image:
    """Any supported image value → upright RGB PIL image (raises ImageSkipped with reason and where)."""
    data, where = _read_source(source, Path(base_dir) if base_dir is not None else None)
    return decode_image(data, where, policy)
