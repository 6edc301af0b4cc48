"""How data sets load images: the one loader (`vlmgraft.images`) with local files on, failures as `ImageSkipped`.

Readers raise `ImageSkipped(reason, where, detail)` for an image that cannot be used; `SampleDataset` catches it,
counts it in a `Tally` with the row it came from and moves on, so one bad file never ends a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from vlmgraft.images import ImageError, ImagePolicy, load_image_oriented

__all__ = ["DEFAULT_POLICY", "ImagePolicy", "ImageSkipped", "load_image", "skipping"]

# Data sets read their own files; remote URLs stay off (download them once, not in every epoch's workers), and the
# pixel limit, not a byte limit, bounds what one image may cost.
DEFAULT_POLICY = ImagePolicy(allow_local=True, max_bytes=None)


class ImageSkipped(ImageError):
    """An image a data set skips and counts; `where` names the row as well as the file."""


@contextmanager
def skipping(origin: str | None = None) -> Iterator[None]:
    """Turn any ImageError raised inside into an ImageSkipped whose `where` starts with the row's `origin`."""
    try:
        yield
    except ImageError as err:
        where = f"{origin} {err.where}" if origin else err.where
        raise ImageSkipped(err.reason, where, err.detail) from err


def load_image(source, policy: ImagePolicy = DEFAULT_POLICY, base_dir: str | Path | None = None) -> Image.Image:
    """Any supported image value → upright RGB PIL image (raises ImageSkipped with reason and where)."""
    with skipping():
        return load_image_oriented(source, policy, base_dir)[0]
