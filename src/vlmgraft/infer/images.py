"""Turn an image reference (data URL, local path, file:// URL, http(s) URL) into an RGB PIL image, under a policy.

The server and the CLI share this: remote fetching and local file reads are off unless switched on, sizes are capped
before decoding, and every failure is an `ImageError` whose `status` says how an HTTP API should answer (400, 413).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    def __init__(self, message: str, status: int = 400, code: str = "invalid_image"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ImagePolicy:
    allow_remote: bool = False
    allow_local: bool = True
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout_s: float = 15.0


def decode_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Bytes → RGB image; too many bytes → 413, not an image / too many pixels → 400."""
    if len(data) > policy.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {policy.max_bytes} bytes", 413,
                         "image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > policy.max_pixels:
                raise ImageError(f"image is {width}x{height} pixels, over the limit of {policy.max_pixels} pixels",
                                 413, "image_too_large")
            probe.load()
            return probe.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"could not decode the image: {err}") from err


def load_image(reference: str, policy: ImagePolicy) -> Image.Image:
    """A data URL, http(s) URL, file:// URL or local path → RGB image."""
    reference = reference.strip()
    if reference.startswith("data:"):
        return decode_image(_data_url_bytes(reference, policy), policy)
    scheme = urlparse(reference).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageError("remote image URLs are disabled; enable them with --allow-remote-images",
                             code="remote_images_disabled")
        return decode_image(_fetch(reference, policy), policy)
    if scheme == "file":
        path = Path(unquote(urlparse(reference).path))
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive
        raise ImageError(f"unsupported image URL scheme {scheme!r}; use a data URL, http(s) URL or file path")
    else:
        path = Path(reference).expanduser()
    if not policy.allow_local:
        raise ImageError("local image files are disabled; enable them with --allow-local-files",
                         code="local_files_disabled")
    if not path.is_file():
        raise ImageError(f"image file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise ImageError(f"image file {str(path)!r} is {size} bytes, over the limit of {policy.max_bytes} bytes", 413,
                         "image_too_large")
    return decode_image(path.read_bytes(), policy)


def _data_url_bytes(url: str, policy: ImagePolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise ImageError("malformed data URL: expected data:image/<type>;base64,<data>")
    # base64 grows data by 4/3: refuse before decoding what would be over the limit anyway.
    if len(payload) * 3 // 4 > policy.max_bytes + 3:
        raise ImageError(f"image is over the limit of {policy.max_bytes} bytes", 413, "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"malformed data URL: the base64 payload does not decode ({err})") from err


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.timeout_s, follow_redirects=True) as response:
            if response.status_code != 200:
                raise ImageError(f"fetching {url} answered HTTP {response.status_code}")
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > policy.max_bytes:
                    raise ImageError(f"image at {url} is over the limit of {policy.max_bytes} bytes", 413,
                                     "image_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as err:
        raise ImageError(f"could not fetch {url}: {err}") from err
