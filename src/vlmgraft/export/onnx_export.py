"""`vlmgraft export onnx`: three ONNX graphs (vision+connector, token embeddings, decoder with KV cache) + manifest.

torch 2.14's default (dynamo) exporter needs onnxscript, which vlmgraft does not depend on, so the TorchScript
exporter (`dynamo=False`) traces the wrappers in `onnx_wrappers`, in fp32 with eager attention. The export is then
verified with onnxruntime against PyTorch on a real processor batch: image features, first-step logits of the whole
prompt and one cached decode step; the numbers go into `onnx_manifest.json` next to every graph's inputs/outputs.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from vlmgraft.errors import VlmgraftError
from vlmgraft.export import checkpoints
from vlmgraft.export.onnx_runtime import MANIFEST, OnnxVlm
from vlmgraft.export.onnx_wrappers import DecoderWithCache, TokenEmbedder, VisionFeatures, exportable_vision
from vlmgraft.export.parity import parity_inputs
from vlmgraft.graft.build import guard_output
from vlmgraft.model import image_path_for, image_seq_len

FILES = {"vision": "vision.onnx", "embed_tokens": "embed_tokens.onnx", "decoder": "decoder.onnx"}


def _io(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def _export(module, args: tuple, path: Path, inputs: list[dict], outputs: list[dict], opset: int) -> None:
    dynamic = {spec["name"]: {i: d for i, d in enumerate(spec["shape"]) if isinstance(d, str)}
               for spec in inputs + outputs}
    with warnings.catch_warnings():  # the tracer warns about every shape it reads; the verification is what counts
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=[s["name"] for s in inputs], output_names=[s["name"] for s in outputs],
                          dynamic_axes=dynamic, do_constant_folding=True)


def _graph_specs(model) -> dict:
    text, vision = model.config.text_config, model.config.vision_config
    hidden, tile = text.hidden_size, vision.image_size
    kv = [f"past_key_values.{layer}.{part}" for layer in range(text.num_hidden_layers) for part in ("key", "value")]
    kv_shape = ["batch", text.num_key_value_heads, "past_sequence", _head_dim(text)]
    present_shape = ["batch", text.num_key_value_heads, "total_sequence", _head_dim(text)]
    seq = image_seq_len(model.config)
    return {
        "vision": {"inputs": [_io("pixel_values", "float32", ["tiles", 3, tile, tile]),
                              _io("pixel_attention_mask", "int64", ["tiles", tile, tile])],
                   "outputs": [_io("image_features", "float32", ["tiles", seq, hidden])]},
        "embed_tokens": {"inputs": [_io("input_ids", "int64", ["batch", "sequence"])],
                         "outputs": [_io("inputs_embeds", "float32", ["batch", "sequence", hidden])]},
        "decoder": {"inputs": [_io("inputs_embeds", "float32", ["batch", "sequence", hidden]),
                               _io("attention_mask", "int64", ["batch", "total_sequence"]),
                               _io("position_ids", "int64", ["batch", "sequence"]),
                               *[_io(name, "float32", kv_shape) for name in kv]],
                    "outputs": [_io("logits", "float32", ["batch", "sequence", text.vocab_size]),
                                *[_io(name.replace("past_key_values", "present"), "float32", present_shape)
                                  for name in kv]]},
    }


def _head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def _dummy_decoder_args(model) -> tuple:
    """Batch 2, 3 new tokens, 4 cached: no traced dimension is 0 or 1, so none gets baked in as a constant."""
    text = model.config.text_config
    batch, new, cached = 2, 3, 4
    mask = torch.ones(batch, cached + new, dtype=torch.long)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
    past = [torch.randn(batch, text.num_key_value_heads, cached, _head_dim(text))
            for _ in range(2 * text.num_hidden_layers)]
    return (torch.randn(batch, new, text.hidden_size), mask, positions, *past)


def _max_rel(reference: torch.Tensor, got: np.ndarray) -> float:
    return float(np.abs(reference.numpy() - got).max() / max(float(reference.abs().max()), 1e-12))


@torch.no_grad()
def verify(model, processor, folder: Path) -> dict:
    """onnxruntime vs PyTorch on one image prompt: features, first-step logits, one cached decode step."""
    batch = next(b for b in parity_inputs(processor) if "pixel_values" in b)
    runner = OnnxVlm(folder)
    np_batch = {k: v.numpy() for k, v in batch.items()}
    features = runner.image_features(np_batch["pixel_values"], np_batch["pixel_attention_mask"])
    torch_features = model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
    logits, present = runner.prefill(np_batch["input_ids"], np_batch["attention_mask"], np_batch["pixel_values"],
                                     np_batch["pixel_attention_mask"])
    out = model(**batch, use_cache=True)
    next_token = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(next_token)], dim=-1)
    step = model(input_ids=next_token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    step_logits, _ = runner.decode(runner.embeddings(next_token.numpy()), mask.numpy(),
                                   np.full((1, 1), mask.shape[1] - 1), present)
    result = {"image_features": _max_rel(torch.cat(list(torch_features)), features.reshape(-1, features.shape[-1])),
              "prefill_logits": _max_rel(out.logits, logits), "decode_step_logits": _max_rel(step.logits, step_logits),
              "same_next_token": bool(int(logits[0, -1].argmax()) == int(next_token))}
    return result


def export_onnx(source: str, out: Path, opset: int = 17, force: bool = False, tolerance: float = 1e-4,
                log=print) -> dict:
    start = time.perf_counter()
    out = Path(out)
    if Path(source).exists() and out.resolve() in (Path(source).resolve(), *Path(source).resolve().parents):
        raise VlmgraftError(f"--out {str(out)!r} would overwrite the model being exported; choose another folder")
    guard_output(out, force)
    model, processor, ckpt = checkpoints.load_model(source, dtype=torch.float32, attn_implementation="eager")
    family = image_path_for(model).family
    if family.name != "smolvlm":
        raise VlmgraftError(f"ONNX export knows the SmolVLM family only; {source!r} is a {family.name} graft "
                            f"({family.export_architecture}): serve it with `vlmgraft serve` instead")
    out.mkdir(parents=True, exist_ok=True)
    specs = _graph_specs(model)
    sample = next(b for b in parity_inputs(processor) if "pixel_values" in b)
    tiles = sample["pixel_values"][0]
    with exportable_vision(model):
        _export(VisionFeatures(model).eval(), (tiles, sample["pixel_attention_mask"][0]), out / FILES["vision"],
                specs["vision"]["inputs"], specs["vision"]["outputs"], opset)
    _export(TokenEmbedder(model).eval(), (sample["input_ids"].repeat(2, 1),), out / FILES["embed_tokens"],
            specs["embed_tokens"]["inputs"], specs["embed_tokens"]["outputs"], opset)
    _export(DecoderWithCache(model).eval(), _dummy_decoder_args(model), out / FILES["decoder"],
            specs["decoder"]["inputs"], specs["decoder"]["outputs"], opset)
    processor.save_pretrained(out)
    text = model.config.text_config
    manifest = {
        "source": str(ckpt.folder), "opset": opset, "files": FILES, "graphs": specs,
        "image_token_id": model.config.image_token_id, "image_seq_len": image_seq_len(model.config),
        "num_hidden_layers": text.num_hidden_layers, "num_key_value_heads": text.num_key_value_heads,
        "head_dim": _head_dim(text), "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
        "eos_token_id": model.generation_config.eos_token_id,
        "recipe": ["processor(text, images) → input_ids, attention_mask, pixel_values, pixel_attention_mask",
                   "vision: real tiles only (drop all-zero padding tiles) → image_features",
                   "embed_tokens(input_ids); rows where input_ids == image_token_id ← image_features rows, in order",
                   "decoder with past_sequence = 0 first; position_ids = cumsum(attention_mask) - 1; "
                   "feed present.* back as past_key_values.*"],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    check = verify(model, processor, out)
    check["tolerance"] = tolerance
    check["passed"] = all(check[k] <= tolerance for k in ("image_features", "prefill_logits", "decode_step_logits"))
    manifest["verification"] = check
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    log(f"onnxruntime vs PyTorch (relative max |Δ|): features {check['image_features']:.2g}, prefill logits "
        f"{check['prefill_logits']:.2g}, cached step {check['decode_step_logits']:.2g} → "
        f"{'ok' if check['passed'] else 'FAILED'}")
    if not check["passed"]:
        raise VlmgraftError(f"ONNX outputs differ from PyTorch beyond {tolerance:g}; see {out / MANIFEST}")
    log(f"saved {', '.join(FILES.values())} and {MANIFEST} to {out} in {manifest['seconds']} s")
    return manifest
