"""End-to-end training throughput: JPEG files → DataLoader workers → collator → GPU → align/finetune step.

Used by `python bench/bench_train.py --e2e ...`. The model is the real-size graft (random weights) whose image token
is the generated processor's; data are ~2048×1600 JPEGs (17 tiles of 512 px each, ≈1100 image tokens) with ~60–200
text tokens, written once per run. uint8 tiles are normalised on the GPU (`VisionChatCollator.to_device`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from _common import BF16_DENSE_PEAK, build_model, compile_parts, flops_per_sample
from bench_data import real_size_processor, write_data

from vlmgraft.data.collate import VisionChatCollator
from vlmgraft.data.spec import SourceSpec, build_dataset
from vlmgraft.graft.families import SMOLVLM
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.stages import prepare_model
from vlmgraft.train.trainer import label_only_loss


def run_e2e(args) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="vlmgraft-e2e-") as tmp:
        folder = Path(tmp)
        data, fmt = write_data(folder, 128, 2048, 1600)
        processor = real_size_processor(folder)
        model = build_model(args.attn, image_token_id=processor.image_token_id)
        config = TrainConfig(model="m", data="d", stage=args.stage)
        config.lora.r = 16
        model, _ = prepare_model(model, SMOLVLM, config)
        model.train()
        compile_parts(model, args)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        collator = VisionChatCollator(processor, max_length=args.max_length, packing=args.packing, pixels="uint8")
        dataset, _ = build_dataset(SourceSpec(path=str(data), format=fmt, weight=32.0), seed=0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers,
                                             collate_fn=collator, pin_memory=True, prefetch_factor=4,
                                             persistent_workers=True, shuffle=True, drop_last=True)
        samples = tokens = steps = 0
        started = None
        for batch in loader:
            batch = collator.to_device(batch, "cuda", torch.bfloat16)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = label_only_loss(model, batch, padding_mask=args.padding_mask)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if steps == args.warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                continue
            if started is None:
                continue
            plan = batch["loss_plan"]  # counted by the collator: no read-back from the GPU in the loop
            samples += plan.samples
            tokens += plan.tokens
            if steps >= args.warmup + args.steps:
                break
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        sps = samples / seconds
        return {"samples_per_s": round(sps, 2), "tokens_per_s": round(tokens / seconds),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "data_format": fmt,
                "mfu_vs_989tflops": round(sps * flops_per_sample(model) / BF16_DENSE_PEAK, 3)}
