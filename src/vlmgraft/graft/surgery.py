"""The model surgery: a donor's vision tower + any causal LM → one stock transformers VLM of the donor's family.

SmolVLM donors give `SmolVLMForConditionalGeneration`; SigLIP/CLIP encoders give `LlavaForConditionalGeneration`
(their config and connector init live in `vlmgraft.graft.llava`); Qwen2.5-VL donors give
`Exaone4_5_ForConditionalGeneration` (`vlmgraft.graft.exaone`).

The text backbone is built from the LLM's own config (so it is the LLM's class, e.g. Qwen3Model with q/k-norm),
every tensor is placed from a named source, and a ledger records for each key whether it was copied,
re-initialised or dropped and why. Only the connector (or the part of the donor's that no longer fits) is new.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel, SmolVLMConfig

from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import DonorFamily


@dataclass
class Ledger:
    """Each tensor of donor, LLM and graft with what happened to it."""

    copied: dict[str, str] = field(default_factory=dict)  # graft key -> "donor:<key>" / "llm:<key>"
    reinitialised: dict[str, str] = field(default_factory=dict)  # graft key -> reason
    tied: dict[str, str] = field(default_factory=dict)  # graft key -> key it shares storage with
    dropped: dict[str, str] = field(default_factory=dict)  # "donor:<key>" / "llm:<key>" -> reason
    resized_rows: dict[str, list[int]] = field(default_factory=dict)  # graft key -> rows set to the mean row

    def as_dict(self) -> dict:
        return {k: dict(v) for k, v in vars(self).items()}


def graft_config(donor_config, llm_config, image_token_id: int, vocab_size: int) -> SmolVLMConfig:
    """Outer config whose `text_config` is the LLM's own; every level agrees on ids, vocab and tying."""
    text = llm_config.to_dict()
    text["vocab_size"] = vocab_size
    tied = bool(getattr(llm_config, "tie_word_embeddings", False))
    config = SmolVLMConfig(vision_config=donor_config.vision_config.to_dict(), text_config=text,
                           scale_factor=donor_config.scale_factor, image_token_id=image_token_id,
                           tie_word_embeddings=tied, pad_token_id=getattr(llm_config, "pad_token_id", None))
    config.architectures = ["SmolVLMForConditionalGeneration"]
    return config


def connector_std(llm_embeddings: torch.Tensor, fan_in: int) -> float:
    """Init scale for the new projection, chosen so image tokens enter the LLM at its text embeddings' scale.

    SigLIP's post-layernorm outputs are roughly unit-variance per channel, so N(0, s²) weights give outputs of RMS
    ≈ s·sqrt(fan_in); matching that to the RMS of the LLM's embedding rows keeps the first steps from drowning the
    text tokens (too large) or letting the image vanish (too small). A zero init would also give a zero gradient
    through the LLM to nothing, which the audit's gradient check would flag.
    """
    embed_rms = llm_embeddings.float().pow(2).mean().sqrt().item()
    return embed_rms / math.sqrt(fan_in)


def _mean_rows(weight: torch.Tensor, rows: list[int], keep: int) -> None:
    with torch.no_grad():
        weight[rows] = weight[:keep].float().mean(0).to(weight.dtype)


def _donor_target(family: DonorFamily, key: str) -> str | None:
    for prefix in family.donor_vision:
        if key.startswith(prefix):
            return family.donor_vision_target + key[len(prefix):]
    return None


def plan_ledger(family: DonorFamily, donor_keys: list[str], llm_keys: list[str], graft_keys: list[str],
                llm_tied: bool) -> Ledger:
    """Decide, by name alone, where every tensor of the graft comes from and what is left behind."""
    ledger = Ledger()
    graft_set = set(graft_keys)
    for key in donor_keys:
        dropped = next((reason for prefix, reason in family.donor_dropped if key.startswith(prefix)), None)
        if dropped:
            ledger.dropped[f"donor:{key}"] = dropped
        elif family.donor_connector and key.startswith(family.donor_connector):
            target = _donor_target(family, key)
            if key.startswith(family.donor_connector_kept) and target in graft_set:
                ledger.copied[target] = f"donor:{key}"
            else:
                ledger.dropped[f"donor:{key}"] = family.donor_connector_dropped_reason
        elif key.startswith(family.donor_text):
            ledger.dropped[f"donor:{key}"] = "donor language model replaced by the LLM"
        elif (target := _donor_target(family, key)) is not None and target in graft_set:
            ledger.copied[target] = f"donor:{key}"
        else:
            raise VlmgraftError(f"donor tensor {key!r} belongs to no known part of the {family.name} family")
    for key in llm_keys:
        if key.startswith("lm_head.") and llm_tied:
            ledger.dropped[f"llm:{key}"] = "tied to the input embeddings; the graft ties it the same way"
            continue
        if key.startswith("model."):
            target = family.llm + "." + key[len("model."):]
        elif key.startswith("lm_head."):
            target = family.lm_head + key[len("lm_head"):]
        else:
            raise VlmgraftError(f"LLM tensor {key!r} is neither under 'model.' nor 'lm_head.'")
        if target not in graft_set:
            raise VlmgraftError(f"LLM tensor {key!r} has no place in the graft (expected {target!r})")
        ledger.copied[target] = f"llm:{key}"
    for key in graft_keys:
        if key.startswith(family.connector + ".") and key not in ledger.copied:
            ledger.reinitialised[key] = "new projection at the LLM's hidden size"
    if llm_tied:
        ledger.tied[family.lm_head + ".weight"] = family.llm + ".embed_tokens.weight"
    unplaced = graft_set - set(ledger.copied) - set(ledger.reinitialised) - set(ledger.tied)
    if unplaced:
        raise VlmgraftError(f"graft tensors with no source: {sorted(unplaced)}")
    return ledger


ConnectorInit = Callable[[dict[str, torch.Size], torch.Tensor, torch.Generator], dict[str, tuple[torch.Tensor, str]]]


def smolvlm_connector_init(shapes: dict[str, torch.Size], embeddings: torch.Tensor,
                           generator: torch.Generator) -> dict[str, tuple[torch.Tensor, str]]:
    """SmolVLM's one linear projection after the pixel shuffle, at the LLM's embedding scale (`connector_std`)."""
    out = {}
    for key, shape in shapes.items():
        std = connector_std(embeddings, shape[1])
        out[key] = ((torch.randn(shape, generator=generator) * std).to(embeddings.dtype),
                    f"new {tuple(shape)} projection (vision×scale² {shape[1]} → LLM {shape[0]}), "
                    f"N(0, {std:.3g}²) so image tokens enter at the LLM's embedding scale")
    return out


def scaled_normal_init(layer_std: Callable[[str, torch.Size, float], tuple[float, str]]) -> ConnectorInit:
    """A connector init that draws each weight from N(0, std²), with (std, reason) from `layer_std(key, shape,
    RMS of the LLM's embeddings)`; biases start at zero."""
    def init(shapes, embeddings, generator):
        embed_rms = embeddings.float().pow(2).mean().sqrt().item()
        out = {}
        for key, shape in shapes.items():
            if key.endswith(".bias"):
                out[key] = (torch.zeros(shape, dtype=embeddings.dtype), f"new {tuple(shape)} bias, zeros")
                continue
            std, why = layer_std(key, shape, embed_rms)
            out[key] = ((torch.randn(shape, generator=generator) * std).to(embeddings.dtype), why)
        return out

    return init


def vocab_size_for(llm: PreTrainedModel, tokenizer_len: int) -> int:
    llm_vocab = llm.get_input_embeddings().weight.shape[0]
    vocab_size = max(llm_vocab, tokenizer_len)
    if vocab_size > llm_vocab:
        vocab_size = (vocab_size + 63) // 64 * 64  # keep the matrix a friendly multiple, as the LLMs do
    return vocab_size


def build_graft(family: DonorFamily, donor: PreTrainedModel, llm: PreTrainedModel, config: PretrainedConfig,
                new_token_ids: list[int], tokenizer_len: int, seed: int = 0,
                connector_init: ConnectorInit = smolvlm_connector_init) -> tuple[PreTrainedModel, Ledger]:
    """Assemble the graft (`config`: the family's outer config, vocab from `vocab_size_for`); `new_token_ids` are
    rows given to tokens added for images."""
    llm_vocab = llm.get_input_embeddings().weight.shape[0]
    vocab_size = config.get_text_config().vocab_size
    with torch.device("meta"):
        graft = getattr(transformers, family.export_architecture)(config)
    graft_shapes = {k: v.shape for k, v in graft.state_dict().items()}
    llm_tied = bool(getattr(llm.config, "tie_word_embeddings", False))
    donor_state, llm_state = donor.state_dict(), llm.state_dict()
    ledger = plan_ledger(family, list(donor_state), list(llm_state), list(graft_shapes), llm_tied)

    state = {}
    for target, source in ledger.copied.items():
        origin, key = source.split(":", 1)
        state[target] = (donor_state if origin == "donor" else llm_state)[key]
    embed_key = family.llm + ".embed_tokens.weight"
    generator = torch.Generator().manual_seed(seed)
    initialised = connector_init({k: graft_shapes[k] for k in ledger.reinitialised}, state[embed_key], generator)
    for key, (tensor, reason) in initialised.items():
        state[key] = tensor
        ledger.reinitialised[key] = reason

    # Grow the vocabulary when tokens for images did not fit in the LLM's padded rows.
    for key in (embed_key, family.lm_head + ".weight"):
        if key not in state:
            continue
        if state[key].shape[0] < vocab_size:
            grown = state[key].new_zeros((vocab_size, state[key].shape[1]))
            grown[: state[key].shape[0]] = state[key]
            state[key] = grown
        if new_token_ids:
            state[key] = state[key].clone()
            _mean_rows(state[key], new_token_ids, keep=min(tokenizer_len, llm_vocab))
            ledger.resized_rows[key] = list(new_token_ids)

    graft.load_state_dict(state, strict=False, assign=True)
    if llm_tied:
        graft.tie_weights()
    # Non-persistent buffers (rotary inv_freq, position ids) were created on meta: take the sources' own.
    _materialise_buffers(graft, donor, llm, family)
    graft.generation_config = copy.deepcopy(llm.generation_config)
    return graft, ledger


def donor_vision_module(family: DonorFamily, donor: PreTrainedModel) -> torch.nn.Module:
    """The donor's vision tower: under its first vision prefix, or the donor itself (a vision-only checkpoint)."""
    path = family.donor_vision[0].rstrip(".")
    return donor.get_submodule(path) if hasattr(donor, path.split(".")[0]) else donor


def _materialise_buffers(graft: PreTrainedModel, donor: PreTrainedModel, llm: PreTrainedModel,
                         family: DonorFamily) -> None:
    sources = {family.vision: donor_vision_module(family, donor), family.llm: llm.get_submodule("model")}
    for prefix, source in sources.items():
        target = graft.get_submodule(prefix)
        for name, buf in source.named_buffers():
            owner, _, leaf = name.rpartition(".")
            module = target.get_submodule(owner) if owner else target
            module._buffers[leaf] = buf.clone()
        for name, module in target.named_modules():
            for attr in ("original_inv_freq",):
                if hasattr(module, attr) and getattr(module, attr) is not None and getattr(module, attr).is_meta:
                    setattr(module, attr, source.get_submodule(name).__dict__[attr].clone())
    leftovers = [n for n, b in graft.named_buffers() if b.is_meta] + [n for n, p in graft.named_parameters()
                                                                      if p.is_meta]
    if leftovers:
        raise VlmgraftError(f"graft tensors left uninitialised: {leftovers[:5]}")
