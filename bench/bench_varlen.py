"""Ragged cuDNN attention for packed rows (PyTorch's `aten._cudnn_attention_forward` with cumulative sequence
offsets, as nested tensors use it) against padded cuDNN SDPA at the training shapes, one GPU: the same outputs and
gradients as attending each sample alone, and the time. The kernel is wrapped as a custom op (forward, fake shapes,
backward through `aten._cudnn_attention_backward`) so that torch.compile can hold it; on torch 2.11 + cuDNN 9.19 its
gradients came out wrong and 90× slower (bench/RESULTS.md), so vlmgraft does not use it.

    python bench/bench_varlen.py                # 16 samples of ~1,410 tokens, Qwen3-0.6B's 16/8 heads of 128

Checks, one JSON line each: forward and gradients against SDPA run on each sample alone; a zero-length sequence in
the offsets; the run-wide length bound (`longest` = 2048) against the batch's own longest; the op inside a compiled
function (no graph break). Times (median ms of --iters, forward + backward): ragged over the packed tokens vs
padded SDPA over rows rounded up to 64 tokens, as `vlmgraft train` lays them out without packing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from _common import timed


@torch.library.custom_op("bench::ragged_attention", mutates_args=())
def ragged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor,
                     longest: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of (tokens, heads, dim) tensors split into sequences at `offsets` (int32, sequences + 1);
    `longest` bounds every sequence's length. Returns the output and what the backward needs."""
    out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._cudnn_attention_forward(
        query, key, value, None, offsets, offsets, longest, longest, True, 0.0, True, False, scale=scale)
    return out, lse, seed, offset


@ragged_attention.register_fake
def _(query, key, value, offsets, longest, scale):
    # as cuDNN returns them (bench/bench_varlen.py prints the real layout): contiguous (tokens, heads, dim) output,
    # (tokens, heads, 1) float32 log-sum-exp, 0-dim int64 dropout seed and offset
    return (query.new_empty(query.shape), query.new_empty((query.shape[0], query.shape[1], 1), dtype=torch.float32),
            query.new_empty((), dtype=torch.int64), query.new_empty((), dtype=torch.int64))


@torch.library.custom_op("bench::ragged_attention_backward", mutates_args=())
def ragged_attention_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                              offsets: torch.Tensor, longest: int, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # attn_bias: None reaches the op as an undefined tensor (no bias), as PyTorch's own autograd formula passes it
    dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
        grad.contiguous(), query, key, value, out, lse, seed, offset, None, offsets, offsets, longest, longest,
        0.0, True, scale=scale)
    return dq, dk, dv


@ragged_attention_backward.register_fake
def _(grad, query, key, value, out, lse, seed, offset, offsets, longest, scale):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup(ctx, inputs, output):
    query, key, value, offsets, longest, scale = inputs
    out, lse, seed, offset = output
    ctx.save_for_backward(query, key, value, out, lse, seed, offset, offsets)
    ctx.longest, ctx.scale = longest, scale


def _backward(ctx, grad, *unused):
    query, key, value, out, lse, seed, offset, offsets = ctx.saved_tensors
    dq, dk, dv = ragged_attention_backward(grad, query, key, value, out, lse, seed, offset, offsets, ctx.longest,
                                           ctx.scale)
    return dq, dk, dv, None, None, None


ragged_attention.register_autograd(_backward, setup_context=_setup)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling: float | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """As a transformers attention function: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out, the
    samples' offsets in `cu_seq_lens_q`."""
    batch, heads, tokens, dim = query.shape
    scale = scaling if scaling is not None else dim ** -0.5
    q, k, v = (t.transpose(1, 2).reshape(batch * tokens, t.shape[1], dim) for t in (query, key, value))
    out = ragged_attention(q, k, v, cu_seq_lens_q, int(max_length_q or tokens), scale)[0]
    return out.reshape(batch, tokens, heads, dim), None


def per_sample(q, k, v, lengths, scale):
    outs, start = [], 0
    for n in lengths:
        part = [t[start:start + n].transpose(0, 1) for t in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*part, is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1))
        start += n
    return torch.cat(outs)


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--mean", type=int, default=1410)
    parser.add_argument("--spread", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    lengths = torch.randint(args.mean - args.spread, args.mean + args.spread + 1, (args.samples,)).tolist()
    total, heads, kv_heads, dim = sum(lengths), 16, 8, 128
    scale = dim ** -0.5
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    make = lambda h: torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    grad = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16)

    def grads_of(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(grad)
        return out.detach(), [t.grad.clone() for t in (q, k, v)]

    reference, ref_grads = grads_of(lambda: per_sample(q, k, v, lengths, scale))
    try:  # what the op's fake (shape-only) implementation has to match under torch.compile
        with torch.no_grad():
            outputs = torch.ops.aten._cudnn_attention_forward(q, k, v, None, offsets, offsets, 2048, 2048, True, 0.0,
                                                              True, False, scale=scale)
        report(check="output layout", shapes=[list(t.shape) if torch.is_tensor(t) else t for t in outputs],
               strides=[list(t.stride()) if torch.is_tensor(t) else None for t in outputs],
               dtypes=[str(t.dtype) if torch.is_tensor(t) else None for t in outputs])
    except Exception as err:  # noqa: BLE001
        report(check="output layout", ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
    longest = 2048
    variants = {
        "ragged, own longest": lambda: ragged_attention(q, k, v, offsets, max(lengths), scale)[0],
        "ragged, longest 2048": lambda: ragged_attention(q, k, v, offsets, longest, scale)[0],
        "ragged, a zero-length sequence at the end": lambda: ragged_attention(
            q, k, v, torch.cat([offsets, offsets[-1:]]), longest, scale)[0],
    }
    for name, fn in variants.items():
        try:
            out, grads = grads_of(fn)
        except Exception as err:  # noqa: BLE001 - report what cuDNN refused
            report(check=name, ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
            continue
        report(check=name, ok=True, out_max_diff=float((out.float() - reference.float()).abs().max()),
               grad_max_diff=[float((g.float() - r.float()).abs().max()) for g, r in zip(grads, ref_grads, strict=True)],
               ref_abs_max=float(reference.float().abs().max()))

    try:
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        compiled = torch.compile(lambda q4, k4, v4: varlen_attention_forward(
            None, q4, k4, v4, None, cu_seq_lens_q=offsets, max_length_q=longest)[0])
        as4 = lambda t: t.unsqueeze(0).transpose(1, 2)  # noqa: E731 - transformers' (batch, heads, tokens, dim)
        out, grads = grads_of(lambda: compiled(as4(q), as4(k), as4(v)).view(total, heads, dim))
        report(check="compiled", ok=True, graph_breaks=sum(counters["graph_break"].values()),
               out_max_diff=float((out.float() - reference.float()).abs().max()))
    except Exception as err:  # noqa: BLE001
        report(check="compiled", ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")

    width = -(-max(lengths) // 64) * 64
    padded = [torch.randn(args.samples, h, width, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for h in (heads, kv_heads, kv_heads)]
    padded_grad = torch.randn(args.samples, heads, width, dim, device="cuda", dtype=torch.bfloat16)

    def padded_step():
        F.scaled_dot_product_attention(*padded, is_causal=True, enable_gqa=True).backward(padded_grad)

    def ragged_step():
        ragged_attention(q, k, v, offsets, longest, scale)[0].backward(grad)

    times = {}
    for name, step in (("padded SDPA", padded_step), ("ragged", ragged_step)):
        try:
            times[name] = timed(step, args.iters)
        except Exception as err:  # noqa: BLE001
            times[name] = f"{type(err).__name__}: {str(err)[:200]}"
    report(bench="varlen", lengths_mean=statistics.mean(lengths), tokens=total, padded_tokens=args.samples * width,
           fwd_bwd_ms=times, device=torch.cuda.get_device_name(), torch=torch.__version__,
           cudnn=torch.backends.cudnn.version(), cmd="python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
