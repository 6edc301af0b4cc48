"""Each export family's image path, declared once: processor pixel inputs → features → the image tokens' embeddings.

Training, the inference engine, `generate`, chat, serve, detect and eval go through `image_path_for(model)` (the
data pipeline through `image_path_for_processor`); ONNX export asks it the family and refuses all but SmolVLM. A family names the processor outputs it needs (`pixel_keys`), splits one prompt's processor
output into what the engine keeps per request (`prompt_pixels`), batches those for `model.generate()` (`hf_batch`),
counts the image tokens they fill (`token_count`) and encodes them into one row of features per image token
(`encode_images`). `merge` writes the features over the image tokens' embeddings by index, in token order, as every
family's own forward does. The module groups (where the vision tower and connector live) stay declared in
`vlmgraft.graft.families`; each path points at its entry there.
"""

from __future__ import annotations

import torch

from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import EXAONE4_5, LLAVA, SMOLVLM, DonorFamily, family_for
from vlmgraft.model.common import image_seq_len, unwrap_model


class ImagePath:
    """The parts shared by every family; subclasses say how their pixels are shaped and encoded."""

    family: DonorFamily
    pixel_keys: tuple[str, ...] = ("pixel_values",)

    def prompt_pixels(self, batch) -> dict[str, torch.Tensor] | None:
        """One prompt's processor output → the pixel tensors the engine keeps for it (None: no image)."""
        if batch.get("pixel_values") is None:
            return None
        return {key: batch[key] for key in self.pixel_keys if batch.get(key) is not None}

    def concat(self, pixels: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Several prompts' pixels as one input, in prompt order (their features then follow the same order)."""
        return {key: torch.cat([p[key] for p in pixels]) for key in pixels[0]}

    def hf_batch(self, pixels: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
        """The pixel keyword arguments of `model.generate()` for a batch of prompts (None: a text-only prompt)."""
        present = [p for p in pixels if p is not None]
        return self.concat(present) if present else {}

    def token_count(self, model, pixels: dict[str, torch.Tensor] | None) -> int:
        """How many image tokens the prompt must hold for these pixels."""
        raise NotImplementedError

    def encode_images(self, model, pixels: dict[str, torch.Tensor], chunk: int | None = None) -> torch.Tensor:
        """Pixels → features (image tokens, hidden), in token order. `chunk`: images (or tiles) per vision forward."""
        raise NotImplementedError

    def train_embeddings(self, model, inputs: dict, plan) -> torch.Tensor | None:
        """The training step's token embeddings with the images' features in place, from the collator's plan
        (its image token positions: nothing read back from the GPU); None where the plan has none."""
        if getattr(plan, "image_positions", None) is None:
            return None
        input_ids = inputs["input_ids"]
        features = self.encode_images(model, {key: inputs[key] for key in self.pixel_keys if key in inputs})
        embeds = unwrap_model(model).get_input_embeddings()(input_ids)
        return self.merge(embeds, plan.image_positions.to(input_ids.device, non_blocking=True), features)

    @staticmethod
    def merge(embeds: torch.Tensor, positions: torch.Tensor, features: torch.Tensor,
              inplace: bool = False) -> torch.Tensor:
        """Embeddings with the rows at flat `positions` (row * width + column) replaced by `features`, in order.
        index_copy checks on the CPU that there are as many features as positions (no read back from the GPU);
        `inplace` writes into `embeds` (inference), else a new tensor keeps autograd's view of both (training)."""
        width = embeds.shape[-1]
        flat, rows = embeds.reshape(-1, width), features.reshape(-1, width).to(embeds.dtype)
        if inplace:
            return flat.index_copy_(0, positions, rows).view_as(embeds)
        return flat.index_copy(0, positions, rows).view_as(embeds)


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class SmolVLMImages(ImagePath):
    """SmolVLM: square tiles (tiles, 3, T, T) plus a pixel mask; each tile gives `image_seq_len` tokens through the
    tower, its post-norm and the pixel-shuffle connector. Training takes `vlmgraft.train.image_inputs`' sync-free
    path with the collator's plan; the engine encodes the real tiles only."""

    family = SMOLVLM
    pixel_keys = ("pixel_values", "pixel_attention_mask")

    def prompt_pixels(self, batch):
        pixels = batch.get("pixel_values")
        if pixels is None:
            return None
        pixels = pixels[0]
        mask = batch.get("pixel_attention_mask")
        mask = mask[0].bool() if mask is not None else torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool)
        real = pixels.flatten(1).ne(0).any(dim=1)  # the processor pads tile lists with all-zero tiles, as HF drops them
        return {"pixel_values": pixels[real].contiguous(), "pixel_attention_mask": mask[real].contiguous()}

    def train_embeddings(self, model, inputs, plan):
        from vlmgraft.train.image_inputs import images_into_embeddings

        if getattr(plan, "image_positions", None) is None:
            return None
        return images_into_embeddings(model, inputs["input_ids"], inputs["pixel_values"], plan)

    def hf_batch(self, pixels):
        """Tiles padded per row with all-zero tiles (which HF drops): (B, N, 3, T, T) + (B, N, T, T)."""
        present = [p for p in pixels if p is not None]
        if not present:
            return {}
        tiles = max(p["pixel_values"].shape[0] for p in present)
        shape = present[0]["pixel_values"].shape[1:]
        values = torch.zeros((len(pixels), tiles, *shape), dtype=present[0]["pixel_values"].dtype)
        mask = torch.zeros((len(pixels), tiles, *shape[1:]), dtype=torch.long)
        for row, p in enumerate(pixels):
            if p is not None:
                values[row, :p["pixel_values"].shape[0]] = p["pixel_values"]
                mask[row, :p["pixel_values"].shape[0]] = p["pixel_attention_mask"].long()
        return {"pixel_values": values, "pixel_attention_mask": mask}

    def token_count(self, model, pixels):
        return 0 if pixels is None else pixels["pixel_values"].shape[0] * image_seq_len(unwrap_model(model).config)

    def encode_images(self, model, pixels, chunk=None):
        """Real tiles (T, 3, H, W) → features (T * image_seq_len, hidden), as SmolVLM's own forward does."""
        base = unwrap_model(model)
        vision, connector = base.get_submodule(self.family.vision), base.get_submodule(self.family.connector)
        tiles, tile_mask = pixels["pixel_values"], pixels.get("pixel_attention_mask")
        if tile_mask is None:
            tile_mask = torch.ones(tiles.shape[0], *tiles.shape[2:], dtype=torch.bool, device=tiles.device)
        size = vision.embeddings.patch_size
        chunk = chunk or tiles.shape[0] or 1
        out = []
        for i in range(0, tiles.shape[0], chunk):
            patches = tile_mask[i:i + chunk].unfold(1, size, size).unfold(2, size, size)
            patch_mask = patches.sum(dim=(-1, -2)) > 0
            hidden = vision(pixel_values=tiles[i:i + chunk].to(_dtype_of(vision)), patch_attention_mask=patch_mask)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            out.append(connector(hidden))
        return torch.cat(out).reshape(-1, out[0].shape[-1])


class LlavaImages(ImagePath):
    """LLaVA: one (3, H, W) image each, `image_seq_length` tokens per image through the HF model's own
    `get_image_features` (tower hidden state chosen by the config, then the projector)."""

    family = LLAVA

    def token_count(self, model, pixels):
        return 0 if pixels is None else pixels["pixel_values"].shape[0] * image_seq_len(unwrap_model(model).config)

    def encode_images(self, model, pixels, chunk=None):
        inner = unwrap_model(model).model
        values = pixels["pixel_values"]
        chunk = chunk or values.shape[0] or 1
        out = []
        for i in range(0, values.shape[0], chunk):
            features = inner.get_image_features(pixel_values=values[i:i + chunk].to(_dtype_of(inner.vision_tower)))
            out += list(features.pooler_output)
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in out])


class ExaoneImages(ImagePath):
    """Exaone4.5 (Qwen2.5-VL tower): flat patches (patches, C·t·p·p) plus `image_grid_thw` (images, 3); an image
    gives t·h·w / merge² tokens through the tower and its patch merger (the connector)."""

    family = EXAONE4_5
    pixel_keys = ("pixel_values", "image_grid_thw")

    def token_count(self, model, pixels):
        if pixels is None:
            return 0
        merge = unwrap_model(model).config.vision_config.spatial_merge_size
        return int(pixels["image_grid_thw"].prod(-1).sum()) // merge**2

    def encode_images(self, model, pixels, chunk=None):
        inner = unwrap_model(model).model
        grid = pixels["image_grid_thw"]
        features = inner.get_image_features(pixels["pixel_values"].to(_dtype_of(inner.visual)),
                                            grid.to(pixels["pixel_values"].device))
        return torch.cat(list(features.pooler_output))


PATHS = {path.family.name: path for path in (SmolVLMImages(), LlavaImages(), ExaoneImages())}


def image_path_for(model_or_config) -> ImagePath:
    """The image path of a (wrapped) graft, or of its config."""
    config = getattr(unwrap_model(model_or_config), "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return PATHS[family_for(model_type).name]
    except VlmgraftError as err:
        raise VlmgraftError(f"model_type {model_type!r} has no image path: vlmgraft runs {', '.join(PATHS)} "
                            f"grafts") from err


def image_path_for_inputs(batch) -> ImagePath:
    """The image path whose processor wrote these outputs (for callers holding a processor but not the model)."""
    if batch.get("image_grid_thw") is not None:
        return PATHS[EXAONE4_5.name]
    return PATHS[SMOLVLM.name if batch.get("pixel_attention_mask") is not None else LLAVA.name]


def image_path_for_processor(processor) -> ImagePath:
    """The image path of a graft's processor (the data pipeline holds the processor, not the model)."""
    name = type(processor).__name__
    if name.startswith("SmolVLM") or name.startswith("Idefics3"):
        return PATHS[SMOLVLM.name]
    if name.startswith("Exaone4_5") or hasattr(getattr(processor, "image_processor", None), "merge_size"):
        return PATHS[EXAONE4_5.name]
    if name.startswith("Llava"):
        return PATHS[LLAVA.name]
    raise VlmgraftError(f"{name} is not the processor of a graft vlmgraft can train (SmolVLM, LLaVA or Exaone4.5)")
