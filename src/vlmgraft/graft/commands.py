"""CLI for the graft: `vlmgraft build` and `vlmgraft audit`."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    build = sub.add_parser("build", help="graft a VLM's vision tower onto a causal LM, audit it, save it")
    build.add_argument("--vision", required=True, help="vision donor: hub id or local folder (a SmolVLM2-family VLM; a "
                       "SigLIP/CLIP encoder, dual or vision-only, exported as LLaVA; or a Qwen2.5-VL, exported as "
                       "Exaone4.5)")
    build.add_argument("--llm", required=True, help="causal LM: hub id or local folder")
    build.add_argument("--out", required=True, type=Path, help="output folder (never overwritten without --force)")
    build.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights (bfloat16, float16, float32)")
    build.add_argument("--image-token", default=None, help="override the image placeholder token string")
    build.add_argument("--seed", type=int, default=0, help="seed of the connector initialisation")
    build.add_argument("--device", default="auto", help="where the audit runs: auto (CUDA if available), cpu, cuda")
    build.add_argument("--image-size", type=int, default=None,
                       help="SigLIP2 NaFlex donors: the fixed resolution to convert to (default: the native grid)")
    build.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    build.set_defaults(func=_build)

    audit = sub.add_parser("audit", help="re-run the graft audit on a saved folder")
    audit.add_argument("folder")
    audit.add_argument("--vision", required=True, help="the donor the folder was built from")
    audit.add_argument("--llm", required=True, help="the LLM the folder was built from")
    audit.set_defaults(func=_audit)


def _build(args) -> int:
    from vlmgraft.graft.build import BuildOptions, build

    build(BuildOptions(vision=args.vision, llm=args.llm, out=args.out, dtype=args.dtype, force=args.force,
                       image_token=args.image_token, seed=args.seed, device=args.device,
                       image_size=args.image_size))
    return 0


def _audit(args) -> int:
    from vlmgraft.graft.build import audit_folder

    return 0 if audit_folder(args.folder, args.vision, args.llm).passed else 1
