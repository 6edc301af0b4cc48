"""Attention kernels at the training shapes, one GPU: which SDPA backend (or flex attention) is fastest for the
LLM's causal GQA attention (forward + backward) and for the vision tower's tiles (forward only, frozen in `align`).

    python bench/bench_attention.py                      # the real-size shapes of bench_train_run.py at batch 16
    python bench/bench_attention.py --batch 4 --seq 1408

Shapes: Qwen3-0.6B text (16 query heads, 8 KV heads, head dim 128, causal) over `--batch` rows of `--seq` tokens;
SmolVLM2-256M vision (12 heads, head dim 64, not causal) over 17 tiles × `--batch` of 1024 patches. Prints one JSON
line per (shape, kernel): median milliseconds over --iters calls and the TFLOP/s that implies (causal attention
counted at half the full product, the backward at 2.5× the forward), and the largest difference from the math
backend's output in float32 on a slice of the batch.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from _common import timed
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention_fn(kernel: str, causal: bool, gqa: bool):
    if kernel == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention)
        masks: dict = {}

        def flex(q, k, v):
            if causal and q.shape[-2] not in masks:
                masks[q.shape[-2]] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[-2],
                                                       q.shape[-2], device=q.device)
            return compiled(q, k, v, block_mask=masks.get(q.shape[-2]), enable_gqa=gqa)

        return flex

    def sdpa(q, k, v):
        with sdpa_kernel([KERNELS[kernel]]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return sdpa


def measure(name: str, kernel: str, shape_q, shape_kv, causal: bool, backward: bool, iters: int) -> dict:
    gqa = shape_q[1] != shape_kv[1]
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    batch, heads, seq, dim = shape_q
    forward_flop = 4 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)
    row = {"bench": "attention", "shape": name, "kernel": kernel, "q": list(shape_q), "kv": list(shape_kv),
           "causal": causal}
    fn = attention_fn(kernel, causal, gqa)
    try:
        with torch.no_grad():
            reference = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float(), is_causal=causal,
                                                       enable_gqa=gqa)
            row["max_abs_diff"] = float((fn(q[:1], k[:1], v[:1]).float() - reference).abs().max())
            row["fwd_ms"] = round(timed(lambda: fn(q, k, v), iters), 3)
        row["fwd_tflops"] = round(forward_flop / row["fwd_ms"] / 1e9, 1)
        if backward:
            grad = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)

            def step():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(grad)

            row["fwd_bwd_ms"] = round(timed(step, iters), 3)
            row["bwd_tflops"] = round(2.5 * forward_flop / (row["fwd_bwd_ms"] - row["fwd_ms"]) / 1e9, 1)
    except RuntimeError as err:  # a backend that refuses these inputs says so instead of ending the run
        row["error"] = str(err).splitlines()[0][:300]
    row["device"] = torch.cuda.get_device_name()
    row["torch"] = torch.__version__
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1472, help="LLM row length (bench_train_run's rows at batch 16)")
    parser.add_argument("--tiles", type=int, default=17, help="tiles per sample")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--kernels", default="cudnn,flash,efficient,flex")
    args = parser.parse_args()
    for kernel in args.kernels.split(","):
        measure("text", kernel, (args.batch, 16, args.seq, 128), (args.batch, 8, args.seq, 128), causal=True,
                backward=True, iters=args.iters)
        measure("vision", kernel, (args.batch * args.tiles, 12, 1024, 64), (args.batch * args.tiles, 12, 1024, 64),
                causal=False, backward=False, iters=args.iters)


if __name__ == "__main__":
    main()
