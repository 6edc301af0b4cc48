"""Helpers shared by the bench scripts: the real-size model, its FLOP count per sample, the compile switches and a
CUDA-event timer. Each bench script imports this module and nothing from its siblings' mains.
"""

from __future__ import annotations

import statistics

import torch
from transformers import Qwen3Config, SmolVLMConfig, SmolVLMForConditionalGeneration

from vlmgraft.fixtures.models import real_size_qwen3_config, real_size_vision_config
from vlmgraft.graft.families import SMOLVLM
from vlmgraft.train.speed import compile_regions, fuse_mlp_gelu, patchify_with_matmul
from vlmgraft.train.stages import unwrap_model

IMAGE_TOKEN = 151655
TILES, TOKENS_PER_TILE, TEXT_TOKENS, ANSWER_TOKENS = 17, 64, 300, 60
BF16_DENSE_PEAK = 989e12  # FLOP/s, dense bf16: the same for the H100 and the H200


def build_model(attn: str, image_token_id: int = IMAGE_TOKEN) -> SmolVLMForConditionalGeneration:
    """attn: eager | sdpa | flex (flex attention in the LLM, SDPA in the vision tower, as `attn_implementation:
    auto` picks for packed batches on CUDA)."""
    text: Qwen3Config = real_size_qwen3_config()
    config = SmolVLMConfig(vision_config=real_size_vision_config(), text_config=text.to_dict(), scale_factor=4,
                           image_token_id=image_token_id, tie_word_embeddings=True)
    config._attn_implementation = "sdpa" if attn == "flex" else attn
    config.text_config._attn_implementation = "flex_attention" if attn == "flex" else attn
    config.vision_config._attn_implementation = "sdpa" if attn == "flex" else attn
    with torch.device("cuda"):
        model = SmolVLMForConditionalGeneration(config).to(torch.bfloat16)
    return model


def flops_per_sample(model, tokens: float = TILES * TOKENS_PER_TILE + TEXT_TOKENS, tiles: float = TILES) -> float:
    """Dense matmul FLOPs of one sample's training step, read off what trains. Blocks in the order the step runs them
    (patch embedding, vision layers, connector, LLM layers): the forward costs 2·N per token for the N weights of
    their Linear/Conv2d modules (LoRA's included); the backward adds 2·N_trained for weight gradients and 2·N for
    input gradients wherever a trained weight lies before the block. A vision token is a patch (1024 per tile), a
    connector token is one of the tile's 64 outputs. Attention scores are counted in the vision tower (4·1024²·768 per
    layer and tile, the backward at twice the forward), not in the LLM, as in every earlier MFU figure here."""
    base = unwrap_model(model)
    blocks = [(base.get_submodule(SMOLVLM.vision_patch_embedding), tiles * 1024, 0.0),
              *[(layer, tiles * 1024, 4 * 1024**2 * 768 * tiles) for layer in base.get_submodule(SMOLVLM.vision_layers)],
              (base.get_submodule(SMOLVLM.connector), tiles * TOKENS_PER_TILE, 0.0),
              *[(layer, tokens, 0.0) for layer in base.get_submodule(SMOLVLM.llm_layers)]]
    total, upstream_trains = 0.0, False
    for block, count, attention in blocks:
        weights = [m.weight for name, m in block.named_modules()  # PEFT keeps an idle copy of modules_to_save
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "original_module" not in name]
        n = sum(w.numel() for w in weights)
        trained = sum(w.numel() for w in weights if w.requires_grad)
        backward = 2 * trained * count + (2 * n * count if upstream_trains else 0.0)
        backward += 2 * attention if upstream_trains or trained else 0.0  # q/k/v's gradients pass through it
        total += 2 * n * count + attention + backward
        upstream_trains = upstream_trains or trained > 0
    return total


def compile_parts(model, args) -> None:
    """--compile: the text model as one graph (and, with --compile-vision, the vision tower); --compile-regions:
    every decoder/encoder layer on its own, as `vlmgraft train` does with `compile: true`; --checkpointing: recompute
    LLM activations in backward instead of storing them."""
    base = unwrap_model(model)
    if args.checkpointing:
        base.model.text_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.patchify:
        patchify_with_matmul(model, SMOLVLM)
    if args.fuse_gelu:
        fuse_mlp_gelu(model, SMOLVLM)
    if args.compile_regions:
        compile_regions(model, SMOLVLM)
    if args.compile:
        base.model.text_model = torch.compile(base.model.text_model, dynamic=True)
    if args.compile_vision:
        base.model.vision_model = torch.compile(base.model.vision_model, dynamic=True)


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
