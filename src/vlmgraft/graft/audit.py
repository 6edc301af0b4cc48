"""The graft audit: checks that rule out the silent failures of hand-made grafts.

1. weights: every donor, LLM and graft tensor is accounted for (copied, re-initialised, tied or dropped with a reason);
2. configs: `image_token_id`, vocab size, tying, bos/eos/pad agree on every level (model attributes included, the
   classic "patched the outer model only" bug), and the processor's `image_seq_len` matches the architecture;
3. text parity: text-only logits of the graft equal the LLM's (fp32);
4. vision reaches the LLM: two different images give different next-token logits;
5. trainable path: one backward pass puts a non-zero gradient on the connector;
6. placeholders: an image yields exactly as many image tokens as image features (SmolVLM: a multi-tile image).

The checks run on SmolVLM, LLaVA and Exaone4.5 exports alike; where they differ (tiles, how `image_seq_len` is
derived, Exaone's per-size patch count) the processor's own attributes decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vlmgraft.graft.families import DonorFamily
from vlmgraft.graft.surgery import Ledger
from vlmgraft.model.common import image_seq_len

TEXT_PARITY_TOL = 1e-5
IMAGE_EFFECT_MIN = 1e-6


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    value: float | int | None = None


@dataclass
class AuditReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def add(self, name: str, passed: bool, detail: str, value=None) -> None:
        self.checks.append(Check(name, bool(passed), detail, value))

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        return "\n".join(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in self.checks)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "checks": [vars(c) for c in self.checks]}


def check_ledger(report: AuditReport, ledger: Ledger, graft_keys: set[str], donor_keys: set[str],
                 llm_keys: set[str]) -> None:
    placed = set(ledger.copied) | set(ledger.reinitialised) | set(ledger.tied)
    sources = {src.split(":", 1)[1] for src in ledger.copied.values() if src.startswith("donor:")}
    llm_sources = {src.split(":", 1)[1] for src in ledger.copied.values() if src.startswith("llm:")}
    dropped_donor = {k.split(":", 1)[1] for k in ledger.dropped if k.startswith("donor:")}
    dropped_llm = {k.split(":", 1)[1] for k in ledger.dropped if k.startswith("llm:")}
    unexplained = sorted((graft_keys - placed) | (donor_keys - sources - dropped_donor)
                         | (llm_keys - llm_sources - dropped_llm))
    report.add("weights accounted", not unexplained,
               f"{len(ledger.copied)} copied, {len(ledger.reinitialised)} re-initialised, {len(ledger.tied)} tied, "
               f"{len(ledger.dropped)} dropped" + (f"; unexplained: {unexplained[:6]}" if unexplained else ""),
               len(unexplained))


def check_configs(report: AuditReport, graft, processor, llm_config, llm_generation) -> None:
    cfg, text = graft.config, graft.config.text_config
    tok = processor.tokenizer
    token_id = tok.convert_tokens_to_ids(processor.image_token)
    ids = {"config.image_token_id": cfg.image_token_id,
           "model.model.config.image_token_id": graft.model.config.image_token_id,
           "processor.image_token_id": processor.image_token_id, "tokenizer(image_token)": token_id}
    for owner, module in (("model", graft), ("model.model", graft.model)):  # SmolVLM keeps a copy on the modules
        if hasattr(module, "image_token_id"):
            ids[f"{owner}.image_token_id"] = module.image_token_id
    report.add("image_token_id agrees", len(set(ids.values())) == 1 and token_id != tok.unk_token_id,
               f"{processor.image_token!r} = " + ", ".join(f"{k}={v}" for k, v in ids.items()))

    rows_in = graft.get_input_embeddings().weight.shape[0]
    rows_out = graft.lm_head.weight.shape[0]
    vocab_ok = text.vocab_size == rows_in == rows_out and rows_in >= len(tok)
    report.add("vocab_size agrees", vocab_ok, f"text_config={text.vocab_size}, embeddings={rows_in}, "
               f"lm_head={rows_out}, tokenizer={len(tok)}")

    llm_tied = bool(getattr(llm_config, "tie_word_embeddings", False))
    shares = graft.lm_head.weight.data_ptr() == graft.get_input_embeddings().weight.data_ptr()
    report.add("tie_word_embeddings agrees", cfg.tie_word_embeddings == llm_tied == shares
               and bool(getattr(text, "tie_word_embeddings", llm_tied)) == llm_tied,
               f"LLM={llm_tied}, config={cfg.tie_word_embeddings}, text_config={getattr(text, 'tie_word_embeddings', None)}, "
               f"lm_head shares embeddings={shares}")

    special = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        special[name] = (getattr(text, name, None), getattr(llm_config, name, None))
    gen = graft.generation_config
    eos_list = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    special_ok = all(a == b for a, b in special.values()) and gen.eos_token_id == llm_generation.eos_token_id \
        and gen.pad_token_id == llm_generation.pad_token_id and tok.eos_token_id in eos_list
    report.add("bos/eos/pad agree", special_ok,
               ", ".join(f"{k}: graft={a} llm={b}" for k, (a, b) in special.items())
               + f", generation eos={gen.eos_token_id} pad={gen.pad_token_id}, tokenizer eos={tok.eos_token_id}")

    vision = cfg.vision_config
    if hasattr(processor.image_processor, "merge_size"):  # Exaone: the count follows each image's size
        from vlmgraft.graft.exaone import check_vision_settings

        check_vision_settings(report, graft, processor)
    elif hasattr(processor, "image_seq_len"):
        expected = image_seq_len(cfg)
        report.add("image_seq_len agrees", processor.image_seq_len == expected,
                   f"processor={processor.image_seq_len}, (image_size/patch)²/scale²={expected}")
    else:  # LLaVA: the processor's own count for an image at the tower's resolution
        from vlmgraft.graft.llava import tokens_per_image

        written = tokens_per_image(processor, Image.new("RGB", (vision.image_size, vision.image_size)))
        report.add("image_seq_len agrees", written == cfg.image_seq_length,
                   f"processor writes {written}, config.image_seq_length={cfg.image_seq_length} "
                   f"({cfg.vision_feature_select_strategy!r} strategy, layer {cfg.vision_feature_layer})")


def _prompt_ids(tokenizer, n: int = 24) -> torch.Tensor:
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What colour is the sky? 天空是什么颜色？"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:n]])


@torch.no_grad()
def check_text_parity(report: AuditReport, graft, llm, tokenizer, compare_ids: list[int] | None = None) -> None:
    """Final hidden states through each model's own head rows; identical GEMM shapes keep fp32 noise out."""
    ids = _prompt_ids(tokenizer).to(graft.device)
    rows = llm.get_output_embeddings().weight.shape[0]
    hidden_graft = graft.model(input_ids=ids).last_hidden_state
    hidden_llm = llm.get_decoder()(input_ids=ids.to(llm.device)).last_hidden_state
    a = torch.nn.functional.linear(hidden_graft, graft.lm_head.weight[:rows]).float()
    b = llm.get_output_embeddings()(hidden_llm).float().to(a.device)
    cols = compare_ids if compare_ids is not None else list(range(rows))
    diff = (a[..., cols] - b[..., cols]).abs().max().item()
    report.add("text-only logits = LLM", diff <= TEXT_PARITY_TOL,
               f"max |Δlogit| = {diff:.2e} over {ids.shape[1]} tokens × {len(cols)} ids (tol {TEXT_PARITY_TOL:g})",
               diff)


def _image_batch(processor, images: list[Image.Image], device, question: str = "Describe the image.") -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=[text] * len(images), images=[[im] for im in images], return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in batch.items()}


def probe_images(processor, seed: int = 0) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Two small different images and one large enough to be split into several tiles."""
    rng = np.random.default_rng(seed)
    image_processor = processor.image_processor
    if getattr(image_processor, "max_image_size", None):
        tile = image_processor.max_image_size["longest_edge"]
    elif hasattr(image_processor, "merge_size"):  # Qwen2.5-VL: any size, in whole merged units
        from vlmgraft.graft.exaone import probe_side

        tile = probe_side(image_processor)
    else:  # one image per tower input (LLaVA): the resolution it is resized or cropped to
        tile = image_processor.size.get("height") or image_processor.size.get("shortest_edge")
    noise = Image.fromarray(rng.integers(0, 256, (tile, tile, 3), dtype=np.uint8))
    flat = Image.new("RGB", (tile, tile), (200, 30, 30))
    big = Image.fromarray(rng.integers(0, 256, (int(tile * 1.5), tile * 2, 3), dtype=np.uint8))
    return noise, flat, big


@torch.no_grad()
def check_image_effect(report: AuditReport, graft, processor) -> None:
    noise, flat, _ = probe_images(processor)
    batch = _image_batch(processor, [noise, flat], graft.device)
    logits = graft(**batch).logits[:, -1].float()
    diff = (logits[0] - logits[1]).abs().max().item()
    report.add("images change the output", diff > IMAGE_EFFECT_MIN,
               f"max |Δ next-token logit| between two images = {diff:.3g}", diff)


class _NoTrainableConnector(Exception):
    """The connector has no parameter that can take a gradient."""


def check_connector_gradient(report: AuditReport, graft, processor, family: DonorFamily) -> None:
    noise, _, _ = probe_images(processor)
    batch = _image_batch(processor, [noise], graft.device)
    connector = graft.get_submodule(family.connector)
    # Only the connector may need a gradient: the vision tower then keeps no activations for backward (at real size
    # most of the audit's memory, bench/bench_build.py), and the check still crosses the whole LLM.
    wanted = {id(p) for p in connector.parameters() if p.requires_grad}
    saved = {p: p.requires_grad for p in graft.parameters()}
    for param in graft.parameters():
        param.requires_grad_(id(param) in wanted)
    try:
        if not wanted:
            raise _NoTrainableConnector
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == graft.config.image_token_id, -100)
        graft(**batch, labels=labels).loss.backward()
        norm = sum(float(p.grad.float().norm()) ** 2 for p in connector.parameters() if p.grad is not None) ** 0.5
    except _NoTrainableConnector:
        norm = 0.0
    finally:
        graft.zero_grad(set_to_none=True)
        for param, flag in saved.items():
            param.requires_grad_(flag)
    report.add("connector receives gradient", norm > 0 and np.isfinite(norm), f"‖∇connector‖ = {norm:.3g}", norm)


@torch.no_grad()
def check_placeholders(report: AuditReport, graft, processor) -> None:
    _, _, big = probe_images(processor)
    batch = _image_batch(processor, [big], graft.device)
    n_tokens = int((batch["input_ids"] == graft.config.image_token_id).sum())
    if "pixel_attention_mask" in batch:  # SmolVLM: (batch, tiles, 3, H, W), and the big image must split
        features = graft.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
        tiles = int(batch["pixel_values"].shape[1])
        ok_tiles = tiles > 1
    elif "image_grid_thw" in batch:  # Exaone: the image's patches, as many as its size gives
        features = graft.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        tiles, ok_tiles = int(batch["image_grid_thw"].prod()), True
    else:  # LLaVA: one tower input per image
        features = graft.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        tiles, ok_tiles = int(batch["pixel_values"].shape[0]), True
    n_features = sum(f.shape[0] for f in features)
    ok = n_tokens == n_features and ok_tiles
    report.add("placeholders = image features", ok,
               f"{big.size[0]}×{big.size[1]} image → {tiles} {_unit_name(batch)}, "
               f"{n_tokens} image tokens, {n_features} features")


def _unit_name(batch) -> str:
    return "tiles" if "pixel_attention_mask" in batch else "patches" if "image_grid_thw" in batch else "input"


def run_audit(graft, processor, llm, family: DonorFamily, ledger: Ledger | None, donor_keys: set[str] | None,
              compare_ids: list[int] | None = None) -> AuditReport:
    """All checks on an fp32 graft; `ledger`/`donor_keys` are None when auditing a saved folder."""
    report = AuditReport()
    if ledger is not None and donor_keys is not None:
        graft_keys = {k for k in graft.state_dict()}
        check_ledger(report, ledger, graft_keys, donor_keys, set(llm.state_dict()))
    check_configs(report, graft, processor, llm.config, llm.generation_config)
    graft.eval()
    llm.eval()
    check_text_parity(report, graft, llm, processor.tokenizer, compare_ids)
    check_image_effect(report, graft, processor)
    check_connector_gradient(report, graft, processor, family)
    check_placeholders(report, graft, processor)
    return report
