"""End-to-end training speed through the product itself: `vlmgraft.train.run.train` (GraftTrainer, the HF Trainer's
DataLoader workers, the collator's uint8 tiles) on the real-size graft with random weights, one GPU.

    python bench/bench_train_run.py --root /tmp/vg-real --batch 16 --workers 12 --steps 40 --compile

Builds the graft under ROOT/graft if it is missing (as bench_build.py does), writes ~2048×1600 JPEGs into a
Cauldron parquet (17 tiles each), trains the `align` stage for --steps steps and reads the trainer's own
samples_per_second / tokens_per_second logs (logged every 5 steps; the first two windows, which hold the
compilation, are left out). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from _common import BF16_DENSE_PEAK, TILES, flops_per_sample  # noqa: E402
from bench_data import write_data  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from vlmgraft.train.config import TrainConfig  # noqa: E402
from vlmgraft.train.run import train  # noqa: E402


def ensure_graft(root: Path) -> Path:
    graft = root / "graft"
    if not (graft / "config.json").exists():
        from vlmgraft.fixtures.models import save_real_size_pair
        from vlmgraft.graft.build import BuildOptions, build

        donor, llm = save_real_size_pair(root)
        build(BuildOptions(vision=str(donor), llm=str(llm), out=graft, force=True), log=lambda *_: None)
    return graft


class ProfileSteps(TrainerCallback):
    """--profile FILE: a torch.profiler record of steps [start, start + count): GPU busy time vs. wall time, and
    the heaviest CPU-side and GPU-side operations (where an end-to-end step loses time against compute alone)."""

    def __init__(self, path: str, start: int = 20, count: int = 3):
        self.path, self.start, self.count = path, start, count
        self.prof = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True)
            self.prof.__enter__()
            self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == self.start + self.count:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.began
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            kernels = busy_seconds(self.prof.events())
            head = (f"{self.count} steps: wall {wall:.3f} s, GPU kernels and copies {kernels:.3f} s "
                    f"({100 * kernels / wall:.0f}% busy)\n\n")
            by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
            by_gpu = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
            by_shape = sorted((e for e in self.prof.key_averages(group_by_input_shape=True)
                               if "attention" in e.key or e.key in ("aten::copy_", "aten::mm")),
                              key=lambda e: -e.cpu_time_total)[:20]
            shapes = "".join(f"{e.key:45} x{e.count:<5} CPU {e.cpu_time_total / 1e3:8.2f} ms  GPU "
                             f"{e.device_time_total / 1e3:8.2f} ms  {e.input_shapes}\n" for e in by_shape)
            Path(self.path).write_text(head + "By CPU time:\n" + by_cpu + "\nBy GPU time:\n" + by_gpu
                                       + "\nAttention, copies and matmuls by input shape (CPU-heaviest):\n" + shapes
                                       + "\nEvery kernel and copy, ms per step:\n"
                                       + kernel_table(self.prof.events(), self.count))
            self.prof = None


def kernel_table(events, steps: int, rows: int = 120) -> str:
    """GPU kernels and copies by name (each once, not also under the operator that launched it): total ms per
    step, calls per step, µs per call, heaviest first."""
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(e.name, [0.0, 0])
            entry[0] += e.time_range.end - e.time_range.start
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:rows]
    return "".join(f"{t / 1e3 / steps:9.3f} ms {n / steps:7.1f}x {t / n:9.1f} us  {name[:150]}\n"
                   for name, (t, n) in ranked)


def busy_seconds(events) -> float:
    """Time the GPU ran anything: the union of kernel and copy intervals (summing per-name totals counts an event
    listed under two names twice). Inductor's "## Call CompiledFxGraph ... ##" ranges are left out: they span a
    compiled graph from its first kernel to its last, gaps included (at batch 4 they made 60.6 ms of kernels per
    step read as 75.6 ms busy, bench/RESULTS.md)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## "))
    busy, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e6  # microseconds → s


class SyncStacks(TrainerCallback):
    """--sync-debug FILE: PyTorch's CUDA sync debug mode over steps [start, start + count); every operation that
    makes the CPU wait for the GPU is written to FILE with the Python stack that issued it (one wait per step
    leaves the GPU idle while the CPU queues the next kernels)."""

    def __init__(self, path: str, start: int = 20, count: int = 2):
        self.path, self.start, self.count = path, start, count
        self.seen: dict[str, int] = {}
        self.saved = None

    def _show(self, message, category, filename, lineno, file=None, line=None):
        import traceback

        stack = "".join(traceback.format_stack()[:-2][-14:])
        key = f"{message}\n{stack}"
        self.seen[key] = self.seen.get(key, 0) + 1

    def on_step_begin(self, args, state, control, **kwargs):
        import warnings

        if state.global_step == self.start:
            self.saved = warnings.showwarning
            warnings.simplefilter("always")
            warnings.showwarning = self._show
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        import warnings

        if state.global_step == self.start + self.count and self.saved is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self.saved
            self.saved = None
            text = "".join(f"--- x{n} over {self.count} steps\n{key}\n" for key, n in self.seen.items())
            Path(self.path).write_text(text or f"no synchronising operation in {self.count} steps\n")


class Windows(TrainerCallback):
    """The trainer's own throughput and loss logs, and the trained model's matmul FLOPs per sample (for the MFU)."""

    def __init__(self):
        self.seen: list[tuple[float, float]] = []
        self.losses: list[float] = []  # the same seed and data give the same curve: a check on speed switches
        self.evals: list[tuple[float, float]] = []
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "samples_per_second" in logs:
            self.seen.append((logs["samples_per_second"], logs["tokens_per_second"]))
            # as it happens, so that a run cut short by a time limit still shows how far it got and how fast
            print(f"[{time.strftime('%H:%M:%S')}] step {state.global_step}: {logs['samples_per_second']:.2f} "
                  f"samples/s, loss {logs['loss']:.4f}", file=sys.stderr, flush=True)
            self.losses.append(round(float(logs["loss"]), 4))
        if logs and "eval_loss" in logs:  # --eval-steps: held-out loss and the does-it-see gap, per evaluation
            self.evals.append((round(logs["eval_loss"], 4), round(logs.get("eval_vision_gap", float("nan")), 4)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path("/tmp/vg-real"))
    parser.add_argument("--stage", default="align")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", default="auto", help="DataLoader workers (default: the product's auto)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--compile", action="store_true", help="compile the layers (default: on where supported)")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps (the example "
                        "align.yaml: 8); --steps counts optimizer steps")
    parser.add_argument("--answer-words", default="2,20", help="answer length range in words (170,180: samples of "
                        "1,980-2,020 tokens, near max_length 2048, for the worst-case memory)")
    parser.add_argument("--image-sizes", choices=["fixed", "mixed"], default="fixed",
                        help="fixed: ~2048×1600 px, 17 tiles each; mixed: aspect ratios 1:6 to 6:1, 5-17 tiles "
                             "(every batch shape differs, as with real data)")
    parser.add_argument("--cuda-graphs", action="store_true", help="cuda_graphs: true (replay the compiled layers)")
    parser.add_argument("--eval-steps", type=int, default=0,
                        help="evaluate (loss and the does-it-see probe) on 32 held-out samples every N steps")
    parser.add_argument("--log-every", type=int, default=5, help="optimizer steps per logged window")
    parser.add_argument("--profile", default="", help="write a profile of steps from the middle of the run to this file")
    parser.add_argument("--profile-steps", type=int, default=3, help="how many steps --profile records")
    parser.add_argument("--sync-debug", default="", help="write every CPU-GPU synchronisation of two steps, with its "
                        "stack, to this file")
    args = parser.parse_args()
    graft = ensure_graft(args.root)
    data_dir = args.root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    answer_words = tuple(int(n) for n in args.answer_words.split(","))
    mixed = args.image_sizes == "mixed"
    data, fmt = write_data(data_dir, 256 if mixed else 128, 2048, 1600, answer_words=answer_words,
                           mixed_sizes=mixed)
    mixture = data_dir / "mixture.yaml"
    mixture.write_text(yaml.safe_dump({"sources": [{"path": f"{fmt}:{data}", "weight": 32}]}))
    config = TrainConfig(model=str(graft), data=str(mixture), output_dir=str(args.root / "run"), stage=args.stage,
                         per_device_train_batch_size=args.batch, max_steps=args.steps, logging_steps=args.log_every,
                         gradient_accumulation_steps=args.accumulation,
                         save_steps=10**6, num_sample_images=0, report_to=[], compile=args.compile or None,
                         cuda_graphs=args.cuda_graphs,
                         eval_steps=args.eval_steps or 200)
    config.data_settings.num_workers = int(args.workers) if args.workers.isdigit() else args.workers
    config.data_settings.eval_size = 32 if args.eval_steps else 0
    config.data_settings.packing = args.packing
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    logged = Windows()
    callbacks = (logged, ProfileSteps(args.profile, start=args.steps // 2, count=args.profile_steps)) if args.profile else (logged,)
    if args.sync_debug:
        callbacks += (SyncStacks(args.sync_debug, start=args.steps // 2 + 4),)
    train(config, force=True, callbacks=callbacks, echo=lambda *a: print(*a, file=sys.stderr))
    windows = logged.seen
    samples_per_s = statistics.median(w[0] for w in windows[2:]) if len(windows) > 2 else None
    tokens_per_s = statistics.median(w[1] for w in windows[2:]) if len(windows) > 2 else None
    mfu = None
    if samples_per_s and not mixed:  # every bench image is cut into 17 tiles (2048×~1600 px, 512-px tiles + the global one)
        flops = flops_per_sample(logged.model, tokens=tokens_per_s / samples_per_s, tiles=TILES)
        mfu = round(samples_per_s * flops / BF16_DENSE_PEAK, 3)
    print(json.dumps({
        "bench": "train_run", **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "samples_per_s": round(samples_per_s, 2) if samples_per_s else None,
        "tokens_per_s": round(tokens_per_s) if tokens_per_s else None, "mfu_vs_989tflops": mfu,
        "windows": windows, "losses": logged.losses, "evals": logged.evals, "wall_s": round(time.perf_counter() - started, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "data_format": fmt,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cmd": "python " + " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
