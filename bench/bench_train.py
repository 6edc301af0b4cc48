"""Training throughput of the real-size graft (SmolVLM2-256M vision + Qwen3-0.6B text, random weights) on one GPU.

    python bench/bench_train.py --mode seed           # the seeds' recipe: eager, batch 1, padded to 2048, full logits
    python bench/bench_train.py --mode ours --batch 8 # sdpa, dynamic padding, label-only logits (GraftTrainer's loss)
    python bench/bench_train.py --mode ours --batch 16 --packing --attn flex --compile-regions  # the product's fast path
    python bench/bench_train.py --mode ours --batch 8 --stage finetune   # needs peft
    python bench/bench_train.py --mode ours --batch 8 --e2e --workers 12 # with data loading (JPEG decode + processor)

Compute-only modes feed synthetic tensors shaped like a Cauldron sample: 17 tiles of 512 px → 1088 image tokens, plus
~300 text tokens of which ~60 are answer tokens that carry labels. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _common import (
    ANSWER_TOKENS,
    BF16_DENSE_PEAK,
    IMAGE_TOKEN,
    TEXT_TOKENS,
    TILES,
    TOKENS_PER_TILE,
    build_model,
    compile_parts,
    flops_per_sample,
)

from vlmgraft.graft.families import SMOLVLM
from vlmgraft.model.common import unwrap_model
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.stages import prepare_model
from vlmgraft.train.trainer import label_only_loss


def sample_ids(rng: torch.Generator, pad_to: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's ids and labels: text, 17×64 image tokens, more text, then a labelled answer."""
    text = TEXT_TOKENS + int(torch.randint(-40, 40, (1,), generator=rng))
    before = torch.randint(0, 150000, (20,), generator=rng)
    after = torch.randint(0, 150000, (text - 20,), generator=rng)
    ids = torch.cat([before, torch.full((TILES * TOKENS_PER_TILE,), IMAGE_TOKEN), after])
    labels = torch.full_like(ids, -100)
    labels[-ANSWER_TOKENS:] = ids[-ANSWER_TOKENS:]
    if pad_to:
        pad = pad_to - ids.numel()
        ids = torch.cat([ids, torch.zeros(pad, dtype=torch.long)])
        labels = torch.cat([labels, torch.full((pad,), -100)])
    return ids, labels


def synthetic_batch(batch: int, packing: bool, pad_to: int | None, rng: torch.Generator,
                    max_length: int = 2048) -> dict:
    samples = [sample_ids(rng, pad_to) for _ in range(batch)]
    pixels = torch.randn(batch, TILES, 3, 512, 512, generator=rng).clamp(-1, 1).to(torch.bfloat16)
    if packing:  # rows of at most max_length tokens, like VisionChatCollator(packing=True)
        rows: list[list[int]] = []
        for i in range(batch):
            if rows and sum(samples[j][0].numel() for j in rows[-1]) + samples[i][0].numel() <= max_length:
                rows[-1].append(i)
            else:
                rows.append([i])
        width = max(sum(samples[j][0].numel() for j in row) for row in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        position_ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            row_ids = torch.cat([samples[j][0] for j in row])
            ids[r, : row_ids.numel()] = row_ids
            labels[r, : row_ids.numel()] = torch.cat([samples[j][1] for j in row])
            position_ids[r] = torch.cat([torch.arange(samples[j][0].numel()) for j in row]
                                        + [torch.arange(width - row_ids.numel())])
        per_row = max(len(row) for row in rows) * TILES
        tiles = torch.zeros(len(rows), per_row, 3, 512, 512, dtype=torch.bfloat16)
        for r, row in enumerate(rows):
            tiles[r, : len(row) * TILES] = pixels[row].reshape(-1, 3, 512, 512)
        out = {"input_ids": ids, "labels": labels, "position_ids": position_ids, "pixel_values": tiles}
    else:
        length = max(s[0].numel() for s in samples)
        ids = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.full((batch, length), -100)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for i, (s_ids, s_labels) in enumerate(samples):
            ids[i, : s_ids.numel()] = s_ids
            labels[i, : s_ids.numel()] = s_labels
            mask[i, : s_ids.numel()] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}
    return {k: v.cuda(non_blocking=True) for k, v in out.items()}


def run_compute(args) -> dict:
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    model = build_model("eager" if args.mode == "seed" else args.attn)
    model, _ = prepare_model(model, SMOLVLM, TrainConfig(model="m", data="d", stage=args.stage))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    compile_parts(model, args)
    batch_size = 1 if args.mode == "seed" else args.batch
    batches = [synthetic_batch(batch_size, args.packing, 2048 if args.mode == "seed" else None, rng,
                               args.max_length) for _ in range(3)]
    torch.cuda.reset_peak_memory_stats()

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if args.mode == "seed":
                loss = model(**batch).loss  # logits over the whole vocabulary at every position
            else:
                loss, _ = label_only_loss(model, batch, padding_mask=args.padding_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(batches[i % 3])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % 3])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    samples = args.steps * batch_size
    split = split_times(model, batches[0], step)
    if args.profile:
        profile_step(lambda: step(batches[0]), args.profile)
    sps = samples / seconds
    tokens = sum(int(b["input_ids"].numel()) for b in batches) / 3 * args.steps / seconds
    return {"samples_per_s": round(sps, 2), "tokens_per_s": round(tokens), "peak_gib":
            round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "mfu_vs_989tflops": round(sps * flops_per_sample(model) / BF16_DENSE_PEAK, 3),
            "rows": int(batches[0]["input_ids"].shape[0]), "row_tokens": int(batches[0]["input_ids"].shape[1]),
            **split}


def profile_step(step, path: str) -> None:
    """--profile FILE: the CUDA kernels of two steps, grouped by name, heaviest first (what to optimise next), then
    where the copies come from (Python stacks of aten::copy_ with their GPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
    copies = sorted((e for e in prof.key_averages(group_by_input_shape=True, group_by_stack_n=6)
                     if e.key == "aten::copy_"), key=lambda e: -e.device_time_total)[:12]
    lines = [f"{e.device_time_total / 1e3:9.2f} ms GPU  x{e.count:<4} shapes {e.input_shapes}\n    "
             + "\n    ".join(e.stack) for e in copies]
    Path(path).write_text(table + "\n\naten::copy_ by stack (two steps):\n" + "\n".join(lines) + "\n")


def split_times(model, batch: dict, step) -> dict:
    """Where a step's time goes: the vision tower + connector forward alone vs. the whole step (median of 3)."""
    base = unwrap_model(model)

    def timed(fn) -> float:
        times = []
        for _ in range(3):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        return sorted(times)[1]

    def vision() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            base.model.get_image_features(batch["pixel_values"], batch.get("pixel_attention_mask"))

    vision_ms, step_ms = timed(vision), timed(lambda: step(batch))
    return {"split_ms": {"vision_forward": round(vision_ms, 1), "step": round(step_ms, 1),
                         "rest_of_step": round(step_ms - vision_ms, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["seed", "ours"], default="ours")
    parser.add_argument("--stage", choices=["align", "finetune", "full"], default="align")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-vision", action="store_true")
    parser.add_argument("--compile-regions", action="store_true", help="compile each layer (vlmgraft's compile: true)")
    parser.add_argument("--attn", choices=["sdpa", "flex"], default="sdpa")
    parser.add_argument("--patchify", action="store_true", help="patch embedding as a matmul (vlmgraft on CUDA)")
    parser.add_argument("--fuse-gelu", action="store_true", help="vision fc1 + GELU in one matmul (vlmgraft on CUDA)")
    parser.add_argument("--profile", default="", help="write a kernel table of two steps to this file")
    parser.add_argument("--padding-mask", action="store_true",
                        help="keep the right-padding attention mask (vlmgraft drops it: SDPA then runs flash)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--e2e", action="store_true", help="include data loading (see bench/bench_train_e2e.py)")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()
    if args.e2e:
        from bench_train_e2e import run_e2e

        result = run_e2e(args)
    else:
        result = run_compute(args)
    print(json.dumps({"bench": "train", **{k: v for k, v in vars(args).items()}, **result,
                      "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "cmd": "python " + " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
