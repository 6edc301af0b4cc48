"""`vlmgraft merge`: fold a LoRA/DoRA checkpoint into its base and save a stock, standalone model folder.

peft's own `merge_and_unload()` does the folding (for DoRA it applies the magnitude/direction rescaling), in fp32 so
the low-rank update is not rounded away before the cast to the saved dtype. The result is checked three ways and the
numbers are printed and saved as `merge_report.json`: merged logits equal the unmerged PeftModel's (fp32), the saved
folder reloads with the Auto classes to exactly the weights that were saved, and no adapter prefix or LoRA tensor
survived in the safetensors keys. A full-model checkpoint is re-saved in the requested dtype and checked the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from vlmgraft.errors import VlmgraftError
from vlmgraft.export import checkpoints
from vlmgraft.export.parity import compare, logits_for, parity_inputs
from vlmgraft.graft.build import DTYPES, guard_output, inside_output
from vlmgraft.infer.prompts import recorded_thinking

REPORT_NAME = "merge_report.json"
ADAPTER_MARKERS = ("base_model.model.", "lora_", "modules_to_save", "original_module", "base_layer",
                   "lora_magnitude_vector")


@dataclass
class MergeOptions:
    source: str
    out: Path
    checkpoint: str = "auto"
    dtype: str = "bfloat16"
    force: bool = False
    base: str | None = None
    tolerance: float = 1e-4


def _guard_paths(out: Path, ckpt: checkpoints.Checkpoint) -> None:
    """--force deletes --out first: it must never be (or contain) the checkpoint or the base being read."""
    out = out.resolve()
    for source in (ckpt.folder, Path(ckpt.base) if ckpt.base and Path(ckpt.base).is_dir() else None):
        if source is not None and inside_output(out, source):
            raise VlmgraftError(f"--out {str(out)!r} would overwrite the model being merged ({source}); "
                                f"choose another folder")


def restore_tying(model, tied: bool) -> str:
    """Make lm_head share storage with the input embeddings again when the base was tied."""
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if not tied:
        return "untied (as the base)"
    if head.data_ptr() == embeddings.data_ptr():
        return "tied (as the base)"
    if torch.equal(head, embeddings):
        model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        return "re-tied (as the base)"
    # lm_head was trained on its own (modules_to_save): tying would silently drop that training.
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = False
    return "untied: lm_head was trained apart from the embeddings, both are saved"


def adapter_keys(folder: Path) -> list[str]:
    stray = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            stray += [k for k in f.keys() if any(marker in k for marker in ADAPTER_MARKERS)]
    return stray


def _merged_model(ckpt: checkpoints.Checkpoint, batches: list[dict], tolerance: float, log):
    """(merged model, reference logits, merge parity or None, whether the base ties lm_head to the embeddings)."""
    if ckpt.kind == "full":
        model = checkpoints.load_full(str(ckpt.folder), torch.float32)
        return model, logits_for(model, batches), None, bool(model.config.tie_word_embeddings)
    log(f"merging adapter {ckpt.folder} into {ckpt.base}")
    peft_model = checkpoints.load_adapter(ckpt, torch.float32)
    tied = bool(peft_model.get_base_model().config.tie_word_embeddings)  # peft may flip it while merging
    kind = "DoRA" if getattr(peft_model.peft_config["default"], "use_dora", False) else "LoRA"
    reference = logits_for(peft_model, batches)
    model = peft_model.merge_and_unload()
    parity = compare(reference, logits_for(model, batches), tolerance)
    parity["adapter"] = kind
    log(f"merge parity ({kind}, fp32): max |Δ| {parity['max_abs_diff']:.3g}, relative {parity['relative_diff']:.3g} "
        f"(tolerance {tolerance:g}) → {'ok' if parity['passed'] else 'FAILED'}")
    return model, reference, parity, tied


def merge(opts: MergeOptions, log=print) -> dict:
    start = time.perf_counter()
    if opts.dtype not in DTYPES:
        raise VlmgraftError(f"--dtype {opts.dtype!r} is not one of {sorted(DTYPES)}")
    dtype = DTYPES[opts.dtype]
    ckpt = checkpoints.describe(checkpoints.resolve_checkpoint(opts.source, opts.checkpoint), opts.base)
    out = Path(opts.out)
    _guard_paths(out, ckpt)
    guard_output(out, opts.force)
    log(f"checkpoint {ckpt.folder} ({ckpt.kind})")
    processor = checkpoints.load_processor(ckpt)
    batches = parity_inputs(processor)
    model, reference, merge_parity, tied = _merged_model(ckpt, batches, opts.tolerance, log)
    tying = restore_tying(model, tied)

    # What the saved weights compute: the merged parameters rounded to the saved dtype, evaluated in fp32. Buffers
    # (rotary frequencies) stay fp32, as a fresh load recomputes them.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype).float()
    expected = logits_for(model, batches)
    model.to(dtype)
    model.config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model

    reloaded = checkpoints.load_full(str(out), torch.float32)
    head, embeddings = reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight
    reloaded_logits = logits_for(reloaded, batches)
    reload_parity = compare(expected, reloaded_logits, 1e-6)
    tied_after_reload = head.data_ptr() == embeddings.data_ptr()
    report = {
        "source": str(opts.source), "checkpoint": str(ckpt.folder), "kind": ckpt.kind,
        "base_model": ckpt.base or ckpt.meta.get("base_model"),
        "stage": ckpt.meta.get("stage"), "enable_thinking": recorded_thinking(ckpt.folder),
        "dtype": opts.dtype, "tying": tying,
        "tied_after_reload": tied_after_reload,
        "merge_parity": merge_parity, "reload_parity": reload_parity,
        "dtype_effect": compare(reference, reloaded_logits, float("inf")),
        "adapter_keys": adapter_keys(out), "seconds": 0.0,
    }
    checks = {"merge parity": merge_parity is None or merge_parity["passed"],
              "reload parity": reload_parity["passed"], "no adapter keys left": not report["adapter_keys"],
              "tying as configured": tied_after_reload == bool(reloaded.config.tie_word_embeddings)}
    report["passed"] = all(checks.values())
    report["seconds"] = round(time.perf_counter() - start, 2)
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    log(f"reload parity: max |Δ| {reload_parity['max_abs_diff']:.3g} → {'ok' if reload_parity['passed'] else 'FAILED'}; "
        f"{opts.dtype} rounding moves logits by {report['dtype_effect']['relative_diff']:.3g} (relative); {tying}")
    if not report["passed"]:
        problems = [name for name, ok in checks.items() if not ok]
        raise VlmgraftError(f"merge check failed ({', '.join(problems)}); see {out / REPORT_NAME}")
    log(f"saved {out} in {report['seconds']} s")
    return report
