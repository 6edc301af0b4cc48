"""The frozen vision tower's forward (the `align` stage) alone, compiled in different ways, on one GPU.

    python bench/bench_vision_tower.py                  # 272 tiles: batch 16 of 17-tile Cauldron samples
    python bench/bench_vision_tower.py --variants tower,tower-realize1 --tiles 68

Real-size SmolVLM2-256M vision tower (random weights, bf16, nothing trains) with the product's CUDA switches (patch
embedding as a matmul, GELU in fc1's epilogue), fed random tiles. Variants:
  encoder-autocast  the encoder compiled as one region, embeddings and post-norm eager, under bf16 autocast (vlmgraft
                    up to commit 319c858: CUDA's autocast makes each layer norm's output float32)
  encoder           the same without autocast (a frozen bf16 tower runs as at inference)
  tower             embeddings + encoder + post-norm as one compiled graph (`image_inputs.tower_features`)
  tower-realizeN    the same with inductor's `realize_acc_reads_threshold=N`: a pointwise result (the residual
                    stream) is stored once it reads more than N buffers, instead of being recomputed by later kernels
Prints one JSON line per variant: median ms per forward (CUDA events), GPU ms per forward by kernel kind (matmul,
attention, layer norm + residual add, copies, other) from a profile of three forwards, and the largest difference from
the eager tower's output.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
from _common import build_model, timed

from vlmgraft.graft.families import SMOLVLM
from vlmgraft.model.common import unwrap_model
from vlmgraft.train.image_inputs import tower_features
from vlmgraft.train.speed import fuse_mlp_gelu, patchify_with_matmul

KINDS = (("matmul", ("nvjet", "gemm", "cutlass", "sm90_xmma")), ("attention", ("sdpa", "fmha", "flash", "attention")),
         ("norm_add", ("layer_norm", "fused_add")), ("copy", ("copy", "Memcpy", "permute", "clone")))


def kind_of(name: str) -> str:
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def kernel_ms(fn, calls: int = 3) -> tuple[dict, list]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("##"):
            ms = (e.time_range.end - e.time_range.start) / 1e3 / calls
            by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + ms
            by_name[e.name] = by_name.get(e.name, 0.0) + ms
    top = sorted(by_name.items(), key=lambda item: -item[1])
    heavy = [[round(ms, 3), name[:90]] for name, ms in top if kind_of(name) not in ("matmul", "attention")][:12]
    return {k: round(v, 2) for k, v in sorted(by_kind.items())}, heavy


def forward_for(variant: str, vision):
    """(the forward to time, a cleanup that undoes this variant's compilation)."""
    if variant.startswith("encoder"):
        vision.encoder.compile()
        autocast = variant == "encoder-autocast"

        def forward(tiles, patches):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                return tower_features(vision, tiles, patches)

        def undo():
            vision.encoder._compiled_call_impl = None
        return forward, undo
    options = {"realize_acc_reads_threshold": int(variant.removeprefix("tower-realize"))} if "realize" in variant else None
    compiled = torch.compile(tower_features, options=options)
    return (lambda tiles, patches: compiled(vision, tiles, patches)), (lambda: None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", type=int, default=272)
    parser.add_argument("--variants", default="encoder-autocast,encoder,tower,tower-realize1,tower-realize2")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    model = build_model("sdpa")
    model.requires_grad_(False)
    patchify_with_matmul(model, SMOLVLM)
    fuse_mlp_gelu(model, SMOLVLM)
    vision = unwrap_model(model).get_submodule(SMOLVLM.vision)
    size = vision.embeddings.patch_size
    generator = torch.Generator("cuda").manual_seed(0)
    tiles = torch.randn(args.tiles, 3, 512, 512, device="cuda", generator=generator).clamp(-1, 1).bfloat16()
    patches = torch.ones(args.tiles, 512 // size, 512 // size, dtype=torch.bool, device="cuda")
    with torch.no_grad():
        reference = tower_features(vision, tiles, patches).float()
        for variant in args.variants.split(","):
            torch._dynamo.reset()
            forward, undo = forward_for(variant, vision)
            for _ in range(3):  # compile, then warm up
                out = forward(tiles, patches)
            torch.cuda.synchronize()
            diff = (out.float() - reference)
            call = functools.partial(forward, tiles, patches)
            ms = timed(call, args.iters)
            kinds, heavy = kernel_ms(call)
            print(json.dumps({"bench": "vision_tower", "variant": variant, "tiles": args.tiles, "ms": round(ms, 2),
                              "kernel_ms": kinds, "kernel_ms_total": round(sum(kinds.values()), 2),
                              "heaviest_memory_bound": heavy, "out_dtype": str(out.dtype),
                              "max_abs_diff": round(diff.abs().max().item(), 4),
                              "rel_l2_diff": round((diff.norm() / reference.norm()).item(), 5),
                              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "cmd": "python " + " ".join(sys.argv)}), flush=True)
            undo()


if __name__ == "__main__":
    main()
