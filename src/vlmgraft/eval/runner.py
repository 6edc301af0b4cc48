"""`run_eval`: load a model (graft, merged folder, checkpoint or run), route samples to tasks, score, write reports."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vlmgraft.data.sample import Sample
from vlmgraft.errors import VlmgraftError
from vlmgraft.eval.parity import PARITY_PROMPTS, evaluate_parity, load_llm_like
from vlmgraft.eval.report import write_report
from vlmgraft.eval.tasks import evaluate_ablation, evaluate_caption, evaluate_grounding, evaluate_vqa, task_of
from vlmgraft.export import checkpoints

TASKS = ("vqa", "grounding", "caption", "parity", "ablation")


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise VlmgraftError(f"--tasks {text!r}: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    return tasks


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_eval(model_dir: str | Path, samples: list[Sample], tasks: list[str] | tuple[str, ...] = TASKS,
             out_dir: str | Path = "eval_results", llm: str | None = None, batch_size: int = 8,
             max_new_tokens: int = 64, vqa_mode: str = "auto", device: str | None = None,
             dtype: torch.dtype | None = None, parity_prompts=PARITY_PROMPTS, seed: int = 0, model=None,
             processor=None, log=print) -> dict:
    """Evaluate `model_dir` on `samples` for `tasks`; writes results.json/.md, predictions.jsonl and plots to
    `out_dir` and returns results.json's content. `model`/`processor` skip loading when already in memory."""
    start = time.perf_counter()
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    ckpt = checkpoints.describe(checkpoints.resolve_checkpoint(model_dir), None)
    if model is None or processor is None:
        model, processor, ckpt = checkpoints.load_model(model_dir, dtype=dtype, device=device)
    routed: dict[str, list[Sample]] = {"vqa": [], "grounding": [], "caption": []}
    for sample in samples:
        routed[task_of(sample)].append(sample)
    common = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    results: dict[str, dict] = {}
    for task in tasks:
        if task in routed and not routed[task]:
            results[task] = {"skipped": f"no {task} samples among the {len(samples)} given"}
        elif task == "vqa":
            results[task] = evaluate_vqa(model, processor, routed["vqa"], mode=vqa_mode, **common)
        elif task == "grounding":
            results[task] = evaluate_grounding(model, processor, routed["grounding"],
                                               batch_size=batch_size, max_new_tokens=max(max_new_tokens, 128))
        elif task == "caption":
            results[task] = evaluate_caption(model, processor, routed["caption"], **common)
        elif task == "ablation":
            results[task] = _ablation(model, processor, routed["vqa"], results.get("vqa"), vqa_mode, seed, common)
        elif task == "parity":
            results[task] = _parity(model, processor, model_dir, ckpt, llm, parity_prompts, dtype, device, common, log)
        log(f"{task}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in results[task].items() if isinstance(v, (int, float, str))))
    out = Path(out_dir)
    slim = write_report(results, out, title=f"Evaluation of {model_dir}")
    meta = {"model": str(model_dir), "checkpoint": str(ckpt.folder), "tasks": list(tasks), "samples": len(samples),
            "routed": {k: len(v) for k, v in routed.items()}, "device": device, "dtype": str(dtype),
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "vqa_mode": vqa_mode,
            "seconds": round(time.perf_counter() - start, 2)}
    (out / "eval_config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and plots in {meta['seconds']} s")
    return slim


def _ablation(model, processor, samples, vqa_result, mode, seed, common) -> dict:
    if not any(s.images for s in samples):
        return {"skipped": "no VQA samples with images"}
    reuse = [r["prediction"] for r in vqa_result["records"]] if vqa_result and "records" in vqa_result else None
    return evaluate_ablation(model, processor, samples, mode=mode, seed=seed, real_predictions=reuse, **common)


def _parity(model, processor, model_dir, ckpt, llm, prompts, dtype, device, common, log) -> dict:
    llm = llm or checkpoints.llm_of(model_dir)
    if not llm:
        log("parity skipped: no base LLM recorded in graft_report.json; pass --llm")
        return {"skipped": "no base LLM known (no graft_report.json found); pass --llm"}
    base, tokenizer = load_llm_like(llm, checkpoints.stored_dtype(ckpt), dtype, device)
    result = evaluate_parity(model, processor, base, tokenizer, prompts, common["batch_size"],
                             min(common["max_new_tokens"], 32))
    result["llm"] = llm
    return result
