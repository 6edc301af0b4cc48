"""CLI for export: `vlmgraft merge` (adapters → standalone folder), `vlmgraft export onnx` and `export gguf`."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    merge = sub.add_parser("merge", help="fold a LoRA/DoRA checkpoint into its base and save a standalone model")
    merge.add_argument("source", help="a run folder, a checkpoint folder (adapter or full model) or a model folder")
    merge.add_argument("--out", required=True, type=Path, help="output folder (never overwritten without --force)")
    merge.add_argument("--checkpoint", default="auto", choices=("auto", "best", "last"),
                       help="for a run folder: auto = final/, else best, else newest; best = best_model_checkpoint; "
                            "last = final/, else newest checkpoint-N")
    merge.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights (bfloat16, float16, float32)")
    merge.add_argument("--base", default=None, help="override the base model recorded in the adapter checkpoint")
    merge.add_argument("--tolerance", type=float, default=1e-4,
                       help="max relative logit difference merged vs. unmerged (fp32)")
    merge.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    merge.set_defaults(func=_merge)

    export = sub.add_parser("export", help="export a model to other formats")
    formats = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser("onnx", help="vision+connector, token embeddings and KV-cache decoder as ONNX graphs")
    onnx.add_argument("model", help="a model folder (merged or not), checkpoint or run folder")
    onnx.add_argument("--out", required=True, type=Path, help="output folder (never overwritten without --force)")
    onnx.add_argument("--opset", type=int, default=17)
    onnx.add_argument("--tolerance", type=float, default=1e-4,
                      help="max relative difference onnxruntime vs. PyTorch in the verification")
    onnx.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    onnx.set_defaults(func=_onnx)

    gguf = formats.add_parser("gguf", help="text model + mmproj (vision) GGUF files for llama.cpp, via its converter")
    gguf.add_argument("model", help="a SmolVLM-family model folder (merged or not), checkpoint or run folder")
    gguf.add_argument("--out", required=True, type=Path, help="output folder (never overwritten without --force)")
    gguf.add_argument("--outtype", default="f16", choices=("f16", "q8_0"),
                      help="the text model's weights; the mmproj (vision tower and connector) stays f16")
    gguf.add_argument("--llama-cpp", default=None,
                      help="llama.cpp's converter source: a llama.cpp checkout, llama-cpp-python's sdist tarball "
                           "or its unpacked folder, or 'download' (pip downloads the tested sdist); "
                           "default: $VLMGRAFT_LLAMA_CPP")
    gguf.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    gguf.set_defaults(func=_gguf)


def _merge(args) -> int:
    from vlmgraft.export.merge import MergeOptions, merge

    merge(MergeOptions(source=args.source, out=args.out, checkpoint=args.checkpoint, dtype=args.dtype,
                       force=args.force, base=args.base, tolerance=args.tolerance))
    return 0


def _onnx(args) -> int:
    from vlmgraft.errors import require_extra

    require_extra("vlmgraft export onnx", "onnx", "onnx", "onnxruntime")
    from vlmgraft.export.onnx_export import export_onnx

    export_onnx(args.model, args.out, opset=args.opset, force=args.force, tolerance=args.tolerance)
    return 0


def _gguf(args) -> int:
    from vlmgraft.errors import require_extra

    require_extra("vlmgraft export gguf", "gguf", "gguf")
    from vlmgraft.export.gguf_export import export_gguf

    export_gguf(args.model, args.out, outtype=args.outtype, llama_cpp=args.llama_cpp, force=args.force)
    return 0
