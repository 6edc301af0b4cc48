"""Images → pixel inputs: SmolVLM tiles (through the stock image processor, or a fast uint8 path normalised on the
GPU), or for the other families whatever the graft's own processor writes (`ProcessorImages`).

SmolVLM's processor resizes an image so its longest edge is `size.longest_edge`, rounds both sides up to multiples
of the tile (`max_image_size.longest_edge`), cuts rows × cols tiles and appends the whole image squashed to one tile
(the global view); without splitting it squashes the image to a single tile. Every tile is square and fully valid.

`mode="processor"` calls the stock processor (float32 tiles, exactly what inference sees). `mode="uint8"` follows the
same geometry and resampling filter with torch's uint8 resize on channels-last views and returns uint8 tiles (kept
channels-last in memory, `_tiles_from_hwc`): a quarter of the bytes to move between worker processes and to the GPU,
no float work and no padded float buffers on the CPU. `normalize_tiles` then rescales them on the device and makes
them planar. The geometry is checked against the processor in the
tests; pixels differ only by the rounding of the uint8 resize.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
from PIL import Image

MAX_SIDE = 4096  # the SmolVLM processor's absolute cap on a resized side


def _longest_edge(height: int, width: int, longest: int) -> tuple[int, int]:
    """Mirror of the processor's resize-to-longest-edge (aspect kept, the other side rounded up to even)."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_SIDE:
        width, height = MAX_SIDE, int(MAX_SIDE / aspect)
    elif height > width and height > MAX_SIDE:
        height, width = MAX_SIDE, int(MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def _tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    """Mirror of the processor's resize_for_vision_encoder: both sides up to multiples of the tile."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def tile_grid(width: int, height: int, longest_edge: int, tile: int, split: bool) -> tuple[int, int]:
    """(rows, cols) the processor will produce for an image of this size; (0, 0) means a single tile."""
    if not split:
        return 0, 0
    h, w = _tile_multiple(*_longest_edge(height, width, longest_edge), tile)
    return (h // tile, w // tile) if h > tile or w > tile else (0, 0)


class ImageEncoder:
    """Encode one RGB image to `(tiles (n, 3, T, T), rows, cols)` with the processor's settings."""

    def __init__(self, image_processor, mode: str = "processor", dtype: torch.dtype = torch.float32):
        if mode not in ("processor", "uint8"):
            raise ValueError(f"pixels={mode!r}: expected 'processor' or 'uint8'")
        self.image_processor, self.mode, self.dtype = image_processor, mode, dtype
        self.tile = int(image_processor.max_image_size["longest_edge"])
        self.longest_edge = int(image_processor.size["longest_edge"])
        self.split = bool(image_processor.do_image_splitting)
        self.mean = list(image_processor.image_mean)
        self.std = list(image_processor.image_std)
        self._interpolation = None

    def fallbacks(self) -> list[dict]:
        """Ever cheaper settings for an image whose tiles do not fit: smaller longest edges, then no splitting."""
        if not self.split:
            return []
        edges = range(self.longest_edge - self.tile, self.tile - 1, -self.tile)
        return [{"longest_edge": edge} for edge in edges] + [{"split": False}]

    def encode(self, image: Image.Image, longest_edge: int | None = None, split: bool | None = None):
        longest_edge = longest_edge or self.longest_edge
        split = self.split if split is None else split
        if self.mode == "uint8":
            return self._encode_uint8(image, longest_edge, split)
        out = self.image_processor(images=[[image]], return_tensors="pt", return_row_col_info=True,
                                   do_image_splitting=split, size={"longest_edge": longest_edge})
        tiles = out["pixel_values"][0]
        return tiles.to(self.dtype), int(out["rows"][0][0]), int(out["cols"][0][0])

    def _encode_uint8(self, image: Image.Image, longest_edge: int, split: bool):
        tile = self.tile
        # An (H, W, 3) array seen as (3, H, W) is channels-last in memory, where torch's antialiased uint8 resize
        # is several times faster than on planar images or in PIL.
        with warnings.catch_warnings():  # a read-only view is fine: every step below writes to new memory
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
        height, width = _longest_edge(image.height, image.width, longest_edge)
        pixels = self._resize(pixels, height, width)
        if not split:
            return _tiles_from_hwc([self._resize(pixels, tile, tile).permute(1, 2, 0)]), 0, 0
        height, width = _tile_multiple(height, width, tile)
        pixels = self._resize(pixels, height, width)
        if height <= tile and width <= tile:
            return _tiles_from_hwc([pixels.permute(1, 2, 0)]), 0, 0
        rows, cols = height // tile, width // tile
        crops = pixels.permute(1, 2, 0).reshape(rows, tile, cols, tile, 3).transpose(1, 2)
        return _tiles_from_hwc([*crops.flatten(0, 1), self._resize(pixels, tile, tile).permute(1, 2, 0)]), rows, cols

    def _resize(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) == (height, width):
            return pixels
        from torchvision.transforms.v2 import functional

        if self._interpolation is None:
            self._interpolation = _interpolation(self.image_processor.resample)
        return functional.resize(pixels, [height, width], interpolation=self._interpolation, antialias=True)


def _tiles_from_hwc(tiles: list[torch.Tensor]) -> torch.Tensor:
    """(T, T, 3) views → one (n, 3, T, T) uint8 tensor kept channels-last in memory. Cutting tiles out of the
    resized image moves whole pixel rows that way; making them planar on the CPU gathered single bytes, a large part
    of a worker's encoding time (bench/bench_data.py). The GPU makes them planar while it normalises them."""
    return torch.stack(tiles).permute(0, 3, 1, 2)


def _interpolation(resample):
    """The processor's resampling filter as torchvision's; Lanczos falls back to bicubic where torchvision lacks it
    (before 0.27), exactly as transformers' own torchvision image processors do."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional

    modes = {0: InterpolationMode.NEAREST, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
             3: InterpolationMode.BICUBIC}
    mode = modes.get(int(resample) if resample is not None else 2, InterpolationMode.BILINEAR)
    if mode == InterpolationMode.LANCZOS:
        try:
            functional.resize(torch.zeros(3, 4, 4, dtype=torch.uint8), [2, 2], interpolation=mode, antialias=True)
        except (ValueError, TypeError, NotImplementedError, RuntimeError):
            mode = InterpolationMode.BICUBIC
    return mode


class ProcessorImages:
    """One image → `(pixel inputs, image tokens)` through the graft's own processor, for families without SmolVLM's
    tiles (LLaVA: one (1, 3, H, W) image; Exaone4.5: flat patches plus `image_grid_thw`). The processor itself
    says how many image tokens stand for the image, so the expansion matches `processor(text=..., images=...)`."""

    def __init__(self, processor, keys: tuple[str, ...], dtype: torch.dtype = torch.float32):
        self.processor, self.keys, self.dtype = processor, keys, dtype
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def fallbacks(self) -> list[dict]:
        return []  # one size per image: nothing cheaper to fall back to

    def encode(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        out = self.processor(text=[self.processor.image_token], images=[image], return_tensors="pt")
        count = int((out["input_ids"][0] == self.image_token_id).sum())
        pixels = {key: out[key] for key in self.keys if out.get(key) is not None}
        pixels["pixel_values"] = pixels["pixel_values"].to(self.dtype)
        return pixels, count


@functools.lru_cache(maxsize=8)
def _channel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building them every batch is a blocking host-to-GPU copy, a stall per training step.
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, 1, 3, 1, 1).to(device) for v in (mean, std))


def _normalize(tiles, tile_mask, mean_t, std_t, dtype: torch.dtype) -> torch.Tensor:
    out = (tiles.float() / 255.0 - mean_t) / std_t
    out = out * tile_mask[:, :, None, None, None].to(out.dtype)
    # uint8 tiles arrive channels-last in memory (`_tiles_from_hwc`); the vision tower wants planar ones.
    return out.to(dtype).contiguous()


@functools.lru_cache(maxsize=1)
def _fused_normalize():
    # Eager, these are six passes over the batch's pixels in float32, full-size copies included
    # (bench/bench_train_run.py --profile FILE); compiled, one kernel reads uint8 and writes
    # `dtype`, computing in float32 as eager does.
    return torch.compile(_normalize, dynamic=True)


def normalize_tiles(tiles: torch.Tensor, tile_mask: torch.Tensor, mean, std, dtype: torch.dtype,
                    fused: bool = False) -> torch.Tensor:
    """uint8 (B, N, 3, T, T) → normalised `dtype`; padding tiles (tile_mask False) stay exactly 0, which is how
    SmolVLM recognises them. `fused` (where inductor can compile): one compiled kernel on CUDA."""
    mean_t, std_t = _channel_constants(tuple(mean), tuple(std), tiles.device)
    normalize = _fused_normalize() if fused and tiles.is_cuda else _normalize
    return normalize(tiles, tile_mask, mean_t, std_t, dtype)
