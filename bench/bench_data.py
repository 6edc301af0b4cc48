"""Data-loading throughput: Cauldron-style parquet of ~2048×1600 JPEGs → training batches, with N DataLoader workers.

    python bench/bench_data.py                              # all modes, workers = CPU count, 60 s each
    python bench/bench_data.py --modes uint8 --workers 16 --seconds 30
    python bench/bench_data.py --rows 64 --workers 2 --seconds 10 --modes processor,uint8   # a quick CPU check

The processor is real-size (SmolVLM2-256M image settings: tiles of 512 px, longest edge 2048, splitting on,
image_seq_len 64) with the tiny Qwen3 tokenizer and the graft's template, so each sample is 17 tiles = 1088 image
tokens + ~320 text tokens (template and tile markers included), the issue's Cauldron-like sample. Modes:
- `processor`: the stock SmolVLM image processor in the workers, float32 tiles (what inference uses);
- `processor-bf16`: the same, tiles cast to bf16 in the workers (half the bytes to move);
- `uint8`: vlmgraft's fast path: PIL resizing in the workers, uint8 tiles, normalised on the GPU by
  `VisionChatCollator.to_device` (timed inside the loop, so the GPU work is counted).
Batches are moved to the GPU (pinned, non-blocking) when one is present. Prints one JSON line per mode, then a
summary line. Needs: torch, transformers, pillow, pyarrow, num2words; not `datasets`.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

if importlib.util.find_spec("vlmgraft") is None:  # run from a checkout without installing; an installed or
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # PYTHONPATH-given vlmgraft wins

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

TARGET = 80.0  # samples/s the trainer needs on a 16-core machine
WORDS = ("the chart shows a steady rise in sales over the year while costs stay flat and the margin grows "
         "in the last quarter the blue line crosses the red one and the table lists four regions").split()


def _image(args: tuple[int, int, int]) -> bytes:
    """A random-ish photo-like JPEG: smooth colour fields plus texture, so it compresses like a real photo."""
    seed, width, height = args
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(low).astype(np.int16) + rng.integers(-14, 15, (height, width, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _mixed_size(rng, seed: int, longest: int) -> tuple[int, int, int]:
    """A size of aspect ratio between 1:6 and 6:1 (log-uniform). Resized to a longest edge of 2048 px, every image
    is cut into 4 tiles along that side, and 1-4 along the other: 5, 9, 13 or 17 tiles with the global one."""
    aspect = float(np.exp(rng.uniform(-np.log(6.0), np.log(6.0))))
    if aspect >= 1:
        return seed, longest, max(16, int(longest / aspect) // 2 * 2)
    return seed, max(16, int(longest * aspect) // 2 * 2), longest


def write_parquet(path: Path, rows: int, width: int, height: int, seed: int = 0,
                  answer_words: tuple[int, int] = (2, 20), mixed_sizes: bool = False) -> Path:
    """`mixed_sizes`: images of every aspect ratio (5-17 tiles, longest edge `width`) instead of ~width × height."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    if mixed_sizes:
        sizes = [_mixed_size(rng, seed * 100_000 + i, width) for i in range(rows)]
    else:
        sizes = [(seed * 100_000 + i, width, height + int(rng.integers(-40, 41)) // 2 * 2) for i in range(rows)]
    with Pool(os.cpu_count()) as pool:
        jpegs = pool.map(_image, sizes, chunksize=4)
    texts = []
    for _ in range(rows):
        question = " ".join(rng.choice(WORDS, 12)) + "?"
        answer = " ".join(rng.choice(WORDS, int(rng.integers(*answer_words)))) + "."
        texts.append([{"user": question, "assistant": answer, "source": "bench"}])
    table = pa.table({"images": [[{"bytes": j, "path": None}] for j in jpegs], "texts": texts})
    pq.write_table(table, path, row_group_size=32)
    return path


def write_messages_jsonl(folder: Path, rows: int, width: int, height: int, seed: int = 0) -> Path:
    """The same images and texts as JPEG files + a messages jsonl (for machines without pyarrow)."""
    rng = np.random.default_rng(seed)
    sizes = [(seed * 100_000 + i, width, height + int(rng.integers(-40, 41)) // 2 * 2) for i in range(rows)]
    with Pool(os.cpu_count()) as pool:
        jpegs = pool.map(_image, sizes, chunksize=4)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "bench.jsonl", "w") as f:
        for i, jpeg in enumerate(jpegs):
            (folder / f"{i}.jpg").write_bytes(jpeg)
            question = " ".join(rng.choice(WORDS, 12)) + "?"
            answer = " ".join(rng.choice(WORDS, int(rng.integers(2, 20)))) + "."
            f.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image", "image": f"{i}.jpg"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]}) + "\n")
    return folder / "bench.jsonl"


def write_data(folder: Path, rows: int, width: int, height: int,
               answer_words: tuple[int, int] = (2, 20), mixed_sizes: bool = False) -> tuple[Path, str]:
    """Cauldron parquet when pyarrow is installed, else the messages-jsonl equivalent (answers of `answer_words`
    words: the default gives ~1,410 tokens per sample, (170, 180) 1,980–2,020 with the bench graft's tokenizer;
    `mixed_sizes`: see write_parquet)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        if answer_words != (2, 20) or mixed_sizes:
            raise SystemExit("longer answers and mixed image sizes need pyarrow (Cauldron parquet)") from None
        return write_messages_jsonl(folder / "jsonl", rows, width, height), "messages"
    name = "bench" + ("" if answer_words == (2, 20) else f"_answers_{answer_words[0]}_{answer_words[1]}")
    name += "_mixed_sizes" if mixed_sizes else ""
    return write_parquet(folder / f"{name}.parquet", rows, width, height, answer_words=answer_words,
                         mixed_sizes=mixed_sizes), "cauldron"


def real_size_processor(folder: Path):
    """A graft processor with SmolVLM2-256M's image settings (tiny random donor/LLM weights, never used)."""
    from transformers import AutoConfig, AutoProcessor

    from vlmgraft.fixtures.models import TINY_VISION, save_tiny_donor, save_tiny_llm
    from vlmgraft.graft.build import make_processor

    donor = save_tiny_donor(folder / "donor", vision=dict(TINY_VISION, patch_size=16), tile_px=512,
                            longest_edge=2048, scale_factor=4)
    llm = save_tiny_llm(folder / "qwen3")
    processor, _, _, _ = make_processor(str(llm), AutoProcessor.from_pretrained(donor),
                                        AutoConfig.from_pretrained(donor), None)
    assert processor.image_seq_len == 64, processor.image_seq_len
    return processor


def per_sample_costs(dataset, collator, count: int = 6) -> dict:
    """Single-process milliseconds per sample: decode (row → Sample) and encode (render, tiles, tokens)."""
    decode, encode, tiles, tokens = [], [], [], []
    for i in range(count):
        start = time.perf_counter()
        sample = dataset[i]
        middle = time.perf_counter()
        encoded = collator.encode(sample)
        end = time.perf_counter()
        if i:  # the first call warms caches
            decode.append(middle - start)
            encode.append(end - middle)
        tiles.append(encoded.tiles.shape[0])
        tokens.append(len(encoded))
    return {"decode_ms": round(1000 * float(np.mean(decode)), 1), "encode_ms": round(1000 * float(np.mean(encode)), 1),
            "tiles_per_sample": float(np.mean(tiles)), "tokens_per_sample": float(np.mean(tokens))}


def run_mode(mode: str, spec, processor, args) -> dict:
    from vlmgraft.data.collate import VisionChatCollator
    from vlmgraft.data.spec import build_dataset

    pixels = "uint8" if mode == "uint8" else "processor"
    pixel_dtype = torch.bfloat16 if mode == "processor-bf16" else torch.float32
    collator = VisionChatCollator(processor, max_length=args.max_length, pixels=pixels, pixel_dtype=pixel_dtype)
    dataset, _ = build_dataset(spec, seed=0)
    costs = per_sample_costs(dataset, collator)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, collate_fn=collator,
                                         pin_memory=cuda, prefetch_factor=args.prefetch, persistent_workers=True,
                                         shuffle=True, drop_last=True)
    samples, started, warm = 0, None, 0
    deadline = None
    for batch in loader:
        batch = collator.to_device(batch, device, torch.bfloat16)
        if cuda:
            torch.cuda.synchronize()
        warm += 1
        if warm == args.warmup_batches:  # worker start-up and first prefetch are not throughput
            started = time.perf_counter()
            deadline = started + args.seconds
            continue
        if started is None:
            continue
        samples += batch["input_ids"].shape[0]
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - started if started else float("nan")
    rate = samples / elapsed if started and elapsed > 0 else 0.0
    return {"mode": mode, "workers": args.workers, "batch": args.batch, "samples": samples,
            "seconds": round(elapsed, 2), "samples_per_s": round(rate, 1), "meets_target": rate >= TARGET,
            "image_processor": type(processor.image_processor).__name__, "device": device, **costs,
            "skipped": collator.stats.total("overflow") + dataset.skips.total()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="processor,processor-bf16,uint8")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=256, help="distinct images written (the epoch repeats them)")
    parser.add_argument("--repeat", type=float, default=16.0, help="mixture weight: rows per epoch = repeat × rows")
    parser.add_argument("--size", default="2048x1600", help="image size WxH (height jittered ±20 px)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup-batches", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--data", type=Path, default=None, help="reuse this parquet instead of writing one")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)  # each worker is one core; the main thread only moves batches

    from vlmgraft.data.spec import SourceSpec

    with tempfile.TemporaryDirectory(prefix="vlmgraft-bench-data-") as tmp:
        folder = Path(tmp)
        width, height = (int(v) for v in args.size.lower().split("x"))
        start = time.perf_counter()
        data, fmt = (args.data, "cauldron") if args.data else write_data(folder, args.rows, width, height)
        written = time.perf_counter() - start
        processor = real_size_processor(folder)
        spec = SourceSpec(path=str(data), format=fmt, weight=args.repeat)
        results = []
        for mode in args.modes.split(","):
            result = run_mode(mode.strip(), spec, processor, args)
            results.append(result)
            print(json.dumps(result), flush=True)
        best = max(results, key=lambda r: r["samples_per_s"])
        print(json.dumps({"summary": True, "target_samples_per_s": TARGET, "best_mode": best["mode"],
                          "best_samples_per_s": best["samples_per_s"], "meets_target": best["meets_target"],
                          "cpu_count": os.cpu_count(), "data_format": fmt,
                          "data_write_s": round(written, 1), "torch": torch.__version__,
                          "transformers": __import__("transformers").__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
