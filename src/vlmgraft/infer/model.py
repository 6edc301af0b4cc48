"""Load a graft folder for inference (device and dtype picked automatically) and name the parts the engine drives."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmgraft.errors import VlmgraftError
from vlmgraft.model.common import DTYPES
from vlmgraft.model.images import ImagePath, image_path_for

log = logging.getLogger(__name__)



def pick_device(device: str = "auto") -> torch.device:
    """"auto" → CUDA, then MPS, then CPU; anything else is checked to exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        raise VlmgraftError(f"--device {device!r} is not a torch device (try auto, cuda, cuda:1, mps or cpu)") from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise VlmgraftError(f"--device {device!r}: CUDA is not available on this machine")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise VlmgraftError(f"--device {device!r}: MPS is not available on this machine")
    return chosen


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" → bf16 on CUDA (fp16 where bf16 is unsupported), fp16 on MPS, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in DTYPES:
        raise VlmgraftError(f"--dtype {dtype!r} is not one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def load_for_inference(model_dir: str | Path, device: str = "auto", dtype: str | torch.dtype = "auto"):
    """A graft folder (any export family) → (model in eval mode on the device, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmgraft import hub

    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    folder = Path(model_dir).expanduser()
    if folder.exists() and not (folder / "config.json").is_file():
        raise VlmgraftError(f"{str(folder)!r} has no config.json: pass a folder written by `vlmgraft build`, "
                            f"`vlmgraft train` or `vlmgraft merge`")
    model = hub.load_model(AutoModelForImageTextToText.from_pretrained, str(model_dir), "model", dtype=torch_dtype,
                     attn_implementation="sdpa")
    processor = hub.load(AutoProcessor.from_pretrained, str(model_dir), "processor")
    model.to(target).eval()
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s on %s as %s", model_dir, target, torch_dtype)
    return model, processor


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the generation config's eos ids plus the tokenizer's eos."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured if isinstance(configured, (list, tuple)) else [configured]) + [tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


@dataclass
class ModelParts:
    """The modules and numbers the engine needs, read from a graft of any export family."""

    model: torch.nn.Module
    images: ImagePath  # the family's pixels → features path
    text_model: torch.nn.Module
    lm_head: torch.nn.Module
    text_config: object
    image_token_id: int
    pad_token_id: int
    eos_token_ids: list[int]
    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    device: torch.device
    dtype: torch.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.get_input_embeddings()(ids)

    def image_tokens(self, pixels: dict[str, torch.Tensor] | None) -> int:
        return self.images.token_count(self.model, pixels)

    def encode_images(self, pixels: dict[str, torch.Tensor], chunk: int | None = None) -> torch.Tensor:
        """One or more prompts' pixels → features (image tokens, hidden), in token order."""
        return self.images.encode_images(self.model, pixels, chunk)


def model_parts(model, tokenizer, eos_ids: list[int] | None = None) -> ModelParts:
    images = image_path_for(model)
    text_model = model.get_submodule(images.family.llm)
    text_config = text_model.config
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    param = next(model.parameters())
    return ModelParts(
        model=model, images=images, text_model=text_model, lm_head=model.get_submodule(images.family.lm_head),
        text_config=text_config, image_token_id=int(model.config.image_token_id), pad_token_id=int(pad or 0),
        eos_token_ids=eos_ids if eos_ids is not None else eos_token_ids(model, tokenizer),
        num_layers=text_config.num_hidden_layers,
        kv_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
        head_dim=head_dim, hidden_size=text_config.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0],
        device=param.device, dtype=param.dtype)
