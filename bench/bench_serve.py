"""Decode speed of the inference engine against plain `model.generate()` on the real-size architecture (one GPU).

Builds SmolVLM2-256M's vision tower + Qwen3-0.6B's text model with random weights (speed does not depend on the
values) in bf16, and a prompt of 17 image tiles x 64 tokens (1088 image tokens) + ~20 text tokens. Measures, for
`model.generate()` and for the engine (CUDA graphs, optionally torch.compile):

* batch-1 time to first token (vision + prefill + first token on the host, pixel values starting on the CPU),
* batch-1 decode tokens/s (after the first token),
* aggregate tokens/s of 32 sequences started together (all tokens / wall time, prefill included) and decode-only.

Variants: `hf` (model.generate), `engine` (CUDA graphs of the eager ops), `engine_compile` (torch.compile'd decode
step with dynamic shapes inside the graphs, what `vlmgraft serve --compile` runs), `engine_compile_static`.

EOS is ignored so every run generates exactly --new-tokens tokens. Prints one JSON line.

    python bench/bench_serve.py                       # all variants
    python bench/bench_serve.py --variants engine     # only the engine with CUDA graphs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if importlib.util.find_spec("vlmgraft") is None:  # a checkout without installing; else the installed one
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

TILES, TEXT_TOKENS = 17, 20


def build(device: torch.device):
    import transformers
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    from vlmgraft.fixtures.models import real_size_qwen3_config, real_size_vision_config
    from vlmgraft.fixtures.tokenizers import qwen3_tokenizer

    tokenizer = qwen3_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    config = SmolVLMConfig(vision_config=real_size_vision_config(), text_config=real_size_qwen3_config().to_dict(),
                           scale_factor=4, image_token_id=image_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = SmolVLMForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None  # never stop early: every run makes exactly N tokens
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(),
            "python": platform.python_version(),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "vision": config.vision_config.to_dict() | {"scale_factor": config.scale_factor},
            "text": {k: getattr(config.text_config, k) for k in ("hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")}}
    return model, tokenizer, image_id, info


def make_prompt(tokenizer, image_id: int, image_seq_len: int):
    prefix = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    suffix = tokenizer.encode("describe this image in detail please<|im_end|>\n<|im_start|>assistant\n",
                              add_special_tokens=False)
    filler = tokenizer.encode(" red", add_special_tokens=False) * max(0, TEXT_TOKENS - len(prefix) - len(suffix))
    ids = prefix + filler + [image_id] * (TILES * image_seq_len) + suffix
    pixels = torch.randn(TILES, 3, 512, 512)
    mask = torch.ones(TILES, 512, 512, dtype=torch.bool)
    return ids, pixels, mask


def _sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def bench_hf(model, ids, pixels, mask, new_tokens: int, batch: int) -> dict:
    device = next(model.parameters()).device

    def run(rows: int, n: int) -> float:
        start = _sync_time()
        inputs = {"input_ids": torch.tensor([ids] * rows, device=device),
                  "attention_mask": torch.ones(rows, len(ids), dtype=torch.long, device=device),
                  "pixel_values": pixels.to(device).unsqueeze(0).expand(rows, -1, -1, -1, -1).contiguous(),
                  "pixel_attention_mask": mask.to(device).unsqueeze(0).expand(rows, -1, -1, -1).contiguous()}
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
        assert out.shape[1] == len(ids) + n
        return _sync_time() - start

    run(1, 2)  # warm-up
    ttft = min(run(1, 1) for _ in range(3))
    total_1 = run(1, new_tokens)
    total_b = run(batch, new_tokens)
    prefill_b = run(batch, 1)
    return {"ttft_ms": round(ttft * 1e3, 1), "decode_tok_s_batch1": round((new_tokens - 1) / (total_1 - ttft), 1),
            f"aggregate_tok_s_batch{batch}": round(batch * new_tokens / total_b, 1),
            f"decode_only_tok_s_batch{batch}": round(batch * (new_tokens - 1) / (total_b - prefill_b), 1),
            f"prefill_ms_batch{batch}": round(prefill_b * 1e3, 1)}


def bench_engine(model, tokenizer, ids, pixels, mask, new_tokens: int, batch: int, compile: bool,
                 compile_dynamic: bool = True) -> dict:
    from vlmgraft.infer.engine import Engine, EngineConfig
    from vlmgraft.infer.sampling import SamplingParams

    config = EngineConfig(max_batch_size=batch, max_seq_len=2048, sync_every=8, compile=compile,
                          compile_dynamic=compile_dynamic, max_prefill_tokens=batch * 1152, decode_bucket=512)
    engine = Engine(model, tokenizer, config, eos_token_ids=[])

    def run(rows: int, params: SamplingParams) -> tuple[float, float, int]:
        start = _sync_time()
        seqs = [engine.add(ids, params, pixels, mask) for _ in range(rows)]
        first = None
        while engine.has_work():
            engine.step()
            if first is None and all(s.output_ids for s in seqs):
                first = time.perf_counter()  # step() already synced to read the first tokens
        end = _sync_time()
        assert all(len(s.output_ids) == params.max_new_tokens for s in seqs)
        return first - start, end - start, sum(len(s.output_ids) for s in seqs)

    greedy = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0.7, top_p=0.95, top_k=20,
                             seed=0)
    warm_start = time.perf_counter()
    for rows in (1, batch):  # first use of each shape runs eagerly, compiles (if asked) and captures graphs
        run(rows, greedy)
        run(rows, greedy)
    run(batch, sampled)
    warmup_s = time.perf_counter() - warm_start
    ttft = min(run(1, SamplingParams(max_new_tokens=1, ignore_eos=True))[0] for _ in range(5))
    first_1, total_1, _ = run(1, greedy)
    first_b, total_b, tokens_b = run(batch, greedy)
    _, total_s, tokens_s = run(batch, sampled)
    return {"ttft_ms": round(ttft * 1e3, 1), "decode_tok_s_batch1": round((new_tokens - 1) / (total_1 - first_1), 1),
            f"aggregate_tok_s_batch{batch}": round(tokens_b / total_b, 1),
            f"decode_only_tok_s_batch{batch}": round(batch * (new_tokens - 1) / (total_b - first_b), 1),
            f"prefill_ms_batch{batch}": round(first_b * 1e3, 1),
            f"aggregate_tok_s_batch{batch}_sampled": round(tokens_s / total_s, 1),
            "warmup_s": round(warmup_s, 1), "graphs": len(engine.runner.graphs),
            "graph_failures": {str(k): v for k, v in engine.runner.failed.items()},
            "kv_cache_gib": round(engine.cache.nbytes / 2**30, 2), "engine_config": vars(config)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="hf,engine,engine_compile",
                        help="comma list of hf, engine, engine_compile (dynamic shapes, as `serve --compile` "
                             "uses), engine_compile_static (one compilation per shape)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_serve.py needs a CUDA GPU")
    device = torch.device("cuda")
    start = time.perf_counter()
    model, tokenizer, image_id, info = build(device)
    seq_len = (512 // 16) ** 2 // 4**2
    ids, pixels, mask = make_prompt(tokenizer, image_id, seq_len)
    result = {"bench": "bench_serve", "config": info | {"prompt_tokens": len(ids), "image_tokens": TILES * seq_len,
                                                        "tiles": TILES, "new_tokens": args.new_tokens,
                                                        "batch": args.batch, "dtype": "bfloat16"},
              "targets": {"decode_tok_s_batch1": 300, "ttft_ms": 40, f"aggregate_tok_s_batch{args.batch}": 2000}}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        began = time.perf_counter()
        try:
            if variant == "hf":
                figures = bench_hf(model, ids, pixels, mask, args.new_tokens, args.batch)
            elif variant in ("engine", "engine_compile", "engine_compile_static"):
                figures = bench_engine(model, tokenizer, ids, pixels, mask, args.new_tokens, args.batch,
                                       compile=variant != "engine", compile_dynamic=variant == "engine_compile")
            else:
                figures = {"error": f"unknown variant {variant!r}"}
        except Exception as err:  # report and go on with the other variants
            figures = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        figures["seconds"] = round(time.perf_counter() - began, 1)
        figures["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result[variant] = figures
        print(f"# {variant}: {json.dumps(figures, default=str)}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
