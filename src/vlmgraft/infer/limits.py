"""What one request may ask of the server, checked before any image is decoded.

A solid-colour PNG of 60 megapixels is a few kilobytes, so a body's byte size says nothing about the memory its
images take once decoded. The image count and the pixels the image headers declare (PIL's lazy `Image.open` reads the
size without decoding) are therefore refused first, and the bytes of request bodies held at once are capped.
"""

from __future__ import annotations

import base64
import binascii
import io
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from vlmgraft.infer.openai_api import ApiError

DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_REQUEST_PIXELS = 64_000_000
DEFAULT_MAX_PENDING_BYTES = 1 << 30


@dataclass(frozen=True)
class RequestLimits:
    max_images: int = DEFAULT_MAX_IMAGES  # image parts in one request
    max_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # all images of one request together
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES  # request bodies being read, parsed and decoded at once
    max_decodes: int = 4  # requests whose images are decoded at the same time (the others wait)


def check_image_count(image_urls: list[tuple[str, str]], limits: RequestLimits) -> None:
    if len(image_urls) > limits.max_images:
        raise ApiError(400, f"the request has {len(image_urls)} images, over this server's limit of "
                            f"{limits.max_images} per request (raise it with `vlmgraft serve "
                            f"--max-images-per-request N`)", param="messages", code="too_many_images")


def declared_size(url: str, param: str) -> tuple[int, int] | None:
    """(width, height) from a data URL's image header, without decoding pixels; None when it is not a data URL
    or does not parse (loading it later reports the precise error)."""
    header, sep, payload = url.strip().partition(",")
    if not header.startswith("data:") or not sep:
        return None
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as probe:
            return probe.size
    except Image.DecompressionBombError as err:  # PIL refuses to even open it: far over any sensible limit
        raise ApiError(413, f"{param}: {err}", param=param, code="image_too_large") from err
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, SyntaxError):
        return None


class PixelTally:
    """Adds up the pixels of a request's images and refuses the request once they pass the limit."""

    def __init__(self, limits: RequestLimits):
        self.limit, self.total = limits.max_pixels, 0

    def add(self, width: int, height: int, param: str) -> None:
        self.total += width * height
        if self.total > self.limit:
            raise ApiError(413, f"{param} is {width}x{height} pixels, which brings this request's images to "
                                f"{self.total:,} pixels, over this server's limit of {self.limit:,} pixels per "
                                f"request (send smaller images, or raise it with `vlmgraft serve "
                                f"--max-request-pixels N`)", param=param, code="too_many_pixels")


class BodyBudget:
    """The bytes of request bodies held at once, from the first byte read until their images are turned into model
    inputs; a request that would pass the limit gets a 503 to retry later rather than memory the host lacks."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @contextmanager
    def hold(self):
        claim = _Claim(self)
        try:
            yield claim
        finally:
            self.held -= claim.bytes


class _Claim:
    def __init__(self, budget: BodyBudget):
        self.budget, self.bytes = budget, 0

    def grow(self, size: int) -> None:
        budget = self.budget
        if budget.held + size > budget.limit:
            raise ApiError(503, f"the server is busy: {budget.held:,} bytes of request bodies are being processed "
                                f"and this one would pass its limit of {budget.limit:,} bytes at once "
                                f"(`vlmgraft serve --max-pending-bytes`); retry shortly", "server_error",
                           code="server_busy", headers={"Retry-After": "1"})
        budget.held += size
        self.bytes += size
