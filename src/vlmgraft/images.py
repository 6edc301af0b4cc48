"""The one image loader: any image reference → an upright RGB PIL image under an `ImagePolicy`, or an `ImageError`.

References: a PIL image, raw bytes, a `{"bytes", "path"}` struct (how `datasets`/parquet store Image features), a
local path (relative to `base_dir` when given), a `file://` URL, a `data:` URL, or an http(s) URL. Data readers, eval,
`chat`, `detect` and the server all load through here, so EXIF orientation, the size limits and the conversion of odd
modes to RGB are the same in training and in inference.

The policy's defaults are the safe ones: no local files, no remote URLs. Remote fetching (`allow_remote`) resolves the
host and refuses any address that is not globally routable unless it lies in `allow_networks`, connects to the very
address it checked (a second lookup could be answered differently), follows at most `max_redirects` redirects checking
every hop the same way, and bounds the connect phase, each read, the whole download and its size.

Two thin adapters sit on top: `vlmgraft.data.images` raises `ImageSkipped` (an ImageError) which data sets count and
skip, and the server answers `ImageError.status` (413 when too large, else 400) with `ImageError.code`.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64_000_000
REASONS = ("missing", "corrupt", "truncated", "too_large", "too_small", "remote_url", "local_file", "blocked_address",
           "fetch_failed", "unsupported", "unreadable")
_CODES = {"too_large": "image_too_large", "remote_url": "remote_images_disabled", "local_file": "local_files_disabled"}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ImageError(ValueError):
    """An image that cannot be used: `reason` is one of REASONS, `where` names the file, URL or field."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        self.reason, self.where, self.detail = reason, where, detail
        super().__init__(f"image {reason}: {where}" + (f" ({detail})" if detail else ""))

    @property
    def status(self) -> int:
        """The HTTP status an API answers: 413 for an image over a size limit, 400 for anything else."""
        return 413 if self.reason == "too_large" else 400

    @property
    def code(self) -> str:
        return _CODES.get(self.reason, "invalid_image")


@dataclass(frozen=True)
class ImagePolicy:
    """What a load may read and how much.

    `allow_networks` lists non-global networks (CIDR) that remote fetches may still reach, e.g. `("10.0.0.0/8",)` for
    an intranet image store; every other private, loopback, link-local or reserved address is refused. `max_pixels`
    guards against decompression bombs and is checked from the header, before any pixel is decoded; `min_side` rejects
    degenerate images such as 1×1 tracking pixels; `max_bytes=None` means no byte limit (the pixel limit still holds).
    """

    allow_remote: bool = False
    allow_local: bool = False
    allow_networks: tuple[str, ...] = ()
    max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 8
    exif_transpose: bool = True
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_redirects: int = 3

    def __post_init__(self):
        for network in self.allow_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as err:
                raise ValueError(f"allow_networks: {network!r} is not an IP network such as 10.0.0.0/8") from err


DEFAULT_POLICY = ImagePolicy()


def address_allowed(address: str, allow_networks: tuple[str, ...] = ()) -> bool:
    """True for a globally routable unicast address, or one inside `allow_networks`."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id ("fe80::1%eth0") names no other host
    if isinstance(ip, ipaddress.IPv6Address):  # an IPv4 address wrapped in IPv6 reaches that IPv4 host
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    if any(ip in ipaddress.ip_network(n, strict=False) for n in allow_networks):
        return True
    return ip.is_global and not ip.is_multicast


def _checked_address(host: str, port: int, policy: ImagePolicy, url: str) -> str:
    """The address to connect to; refused when any address the host resolves to is not allowed."""
    try:
        addresses = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except (socket.gaierror, UnicodeError) as err:
        raise ImageError("fetch_failed", url, f"cannot resolve {host!r}: {err}") from err
    blocked = [a for a in addresses if not address_allowed(a, policy.allow_networks)]
    if blocked or not addresses:
        raise ImageError("blocked_address", url, f"{host!r} resolves to {blocked[0] if blocked else 'nothing'}, a "
                                                 "private, loopback, link-local or reserved address")
    return addresses[0]


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    import httpx

    deadline = time.monotonic() + policy.total_timeout_s
    timeout = httpx.Timeout(connect=policy.connect_timeout_s, read=policy.read_timeout_s,
                            write=policy.read_timeout_s, pool=policy.connect_timeout_s)
    # trust_env=False: a proxy from the environment would connect to a host this check never saw.
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(policy.max_redirects + 1):
            try:
                target = httpx.URL(url)
            except (httpx.InvalidURL, ValueError) as err:
                raise ImageError("unsupported", url, f"not a valid URL: {err}") from err
            if target.scheme not in ("http", "https") or not target.host:
                raise ImageError("unsupported", url, "only http(s) URLs are fetched")
            address = _checked_address(target.host, target.port or (443 if target.scheme == "https" else 80),
                                       policy, url)
            # Connect to the checked address; Host and SNI (so the certificate check) keep the name.
            request = client.build_request("GET", target.copy_with(host=address), headers={"Host": target.netloc},
                                           extensions={"sni_hostname": target.host})
            try:
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = str(target.join(response.headers.get("location", "")))
                        continue
                    if response.status_code != 200:
                        raise ImageError("fetch_failed", url, f"answered HTTP {response.status_code}")
                    return _read_capped(response, url, policy, deadline)
                finally:
                    response.close()
            except httpx.TimeoutException as err:
                phase = "connecting" if isinstance(err, httpx.ConnectTimeout) else "reading"
                limit = policy.connect_timeout_s if phase == "connecting" else policy.read_timeout_s
                raise ImageError("fetch_failed", url, f"timed out {phase} (limit {limit:g} s)") from err
            except httpx.HTTPError as err:
                raise ImageError("fetch_failed", url, str(err) or type(err).__name__) from err
    raise ImageError("fetch_failed", url, f"more than {policy.max_redirects} redirects")


def _read_capped(response, url: str, policy: ImagePolicy, deadline: float) -> bytes:
    limit = policy.max_bytes
    declared = response.headers.get("content-length", "")
    if limit is not None and declared.isdigit() and int(declared) > limit:
        raise ImageError("too_large", url, f"{declared} bytes is over the limit of {limit} bytes")
    chunks, total = [], 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if limit is not None and total > limit:
            raise ImageError("too_large", url, f"over the limit of {limit} bytes")
        if time.monotonic() > deadline:  # a server trickling bytes never trips the per-read timeout
            raise ImageError("fetch_failed", url, f"the download took over {policy.total_timeout_s:g} s")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_bytes(size: int, where: str, policy: ImagePolicy) -> None:
    if policy.max_bytes is not None and size > policy.max_bytes:
        raise ImageError("too_large", where, f"{size} bytes is over the limit of {policy.max_bytes} bytes")


def _data_url(url: str, policy: ImagePolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("corrupt", "data URL", "malformed data URL: expected data:image/<type>;base64,<data>")
    if ";base64" not in header:
        data = unquote_to_bytes(payload)
        _check_bytes(len(data), "data URL", policy)
        return data
    # base64 grows data by 4/3: refuse before decoding what would be over the limit anyway.
    _check_bytes(len(payload) * 3 // 4 - 3, "data URL", policy)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError("corrupt", "data URL", f"malformed data URL: the base64 payload does not decode ({err})") \
            from err
    _check_bytes(len(data), "data URL", policy)
    return data


def _read_file(path: Path, policy: ImagePolicy) -> bytes:
    if not policy.allow_local:
        raise ImageError("local_file", str(path), "local image files are disabled; enable them with --allow-local-files")
    try:
        _check_bytes(path.stat().st_size, str(path), policy)
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ImageError("missing", str(path), "does not exist") from err
    except IsADirectoryError as err:
        raise ImageError("unreadable", str(path), "is a folder, not an image file") from err
    except OSError as err:
        raise ImageError("unreadable", str(path), err.strerror or str(err)) from err


def read_source(source, policy: ImagePolicy, base_dir: Path | None = None) -> tuple[bytes | Image.Image, str]:
    """The encoded bytes (or a PIL image) of any supported reference, and a short name of where they came from."""
    if isinstance(source, Image.Image):
        return source, "<PIL image>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_bytes(len(source), "<bytes>", policy)
        return bytes(source), "<bytes>"
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data:
            _check_bytes(len(data), path or "<bytes>", policy)
            return bytes(data), path or "<bytes>"
        if path:
            return read_source(path, policy, base_dir)
        raise ImageError("missing", "<struct>", "neither bytes nor path")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise ImageError("unsupported", type(source).__name__, "not an image, bytes, path or URL")
    source = source.strip()
    if source.startswith("data:"):
        return _data_url(source, policy), "data URL"
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageError("remote_url", source, "remote image URLs are disabled; enable them with "
                                                   "--allow-remote-images, or download the images first")
        data = _fetch(source, policy)
        return data, source
    if scheme == "file":
        path = Path(unquote(urlparse(source).path))
    elif scheme:
        raise ImageError("unsupported", source, f"unsupported URL scheme {scheme!r}; use a data URL, http(s) URL or "
                                                "file path")
    else:
        path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return _read_file(path, policy), str(path)


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


def _upright(image: Image.Image, policy: ImagePolicy) -> tuple[Image.Image, int]:
    """The image turned as its EXIF orientation tag says, and that tag (1 = already upright)."""
    if not policy.exif_transpose:
        return image, 1
    try:
        orientation = int(image.getexif().get(0x0112, 1))
        if orientation not in range(2, 9):
            return image, 1
        return ImageOps.exif_transpose(image), orientation
    except (ValueError, TypeError, SyntaxError, KeyError, struct.error):
        return image, 1  # a broken EXIF block says nothing reliable about orientation; the pixels are still fine


def decode_image(data: bytes | Image.Image, where: str = "<bytes>",
                 policy: ImagePolicy = DEFAULT_POLICY) -> Image.Image:
    """Encoded bytes (or a PIL image) → upright RGB image within the policy's limits (raises ImageError)."""
    return _decode(data, where, policy)[0]


def _decode(data: bytes | Image.Image, where: str, policy: ImagePolicy) -> tuple[Image.Image, int]:
    if isinstance(data, Image.Image):
        image = data
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ImageError("too_large", where, str(err)) from err
        except UnidentifiedImageError as err:
            raise ImageError("corrupt", where, "could not decode the image: not a recognised image format") from err
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageError(_reason(err), where, f"could not decode the image: {err}") from err
    width, height = image.size
    if width * height > policy.max_pixels:
        raise ImageError("too_large", where, f"{width}x{height} is over the limit of {policy.max_pixels} pixels")
    if min(width, height) < policy.min_side:
        raise ImageError("too_small", where, f"{width}x{height} is under the {policy.min_side} px minimum side")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image, orientation = _upright(image, policy)
            image = to_rgb(image)
    except Image.DecompressionBombError as err:
        raise ImageError("too_large", where, str(err)) from err
    except OSError as err:
        raise ImageError(_reason(err), where, f"could not decode the image: {err}") from err
    except (ValueError, SyntaxError, IndexError, struct.error) as err:  # broken headers surface as these
        raise ImageError("corrupt", where, f"could not decode the image: {err}") from err
    return image, orientation


def load_image_oriented(source, policy: ImagePolicy = DEFAULT_POLICY,
                        base_dir: str | Path | None = None) -> tuple[Image.Image, int]:
    """Like `load_image`, also giving the EXIF orientation (1–8) the stored pixels were turned by."""
    data, where = read_source(source, policy, Path(base_dir) if base_dir is not None else None)
    return _decode(data, where, policy)


def load_image(source, policy: ImagePolicy = DEFAULT_POLICY, base_dir: str | Path | None = None) -> Image.Image:
    """Any supported image reference → upright RGB PIL image (raises ImageError naming the reason and where)."""
    return load_image_oriented(source, policy, base_dir)[0]
