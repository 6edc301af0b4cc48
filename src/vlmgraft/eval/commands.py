"""CLI for evaluation: `vlmgraft eval MODEL --data SPEC [--tasks ...]`."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    ev = sub.add_parser("eval", help="score a model on VQA, grounding, captions, text parity and vision ablation")
    ev.add_argument("model", help="a graft/merged model folder, a checkpoint (adapter or full) or a run folder")
    ev.add_argument("--data", default=None, help="data spec, as for training (see `vlmgraft data`); "
                                                 "not needed for --tasks parity")
    ev.add_argument("--tasks", default="vqa,grounding,caption,parity,ablation",
                    help="comma-separated: vqa, grounding, caption, parity, ablation")
    ev.add_argument("--out", type=Path, default=None, help="report folder (default eval_results/<model name>)")
    ev.add_argument("--llm", default=None, help="base LLM for parity (default: the one in graft_report.json)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most N samples")
    ev.add_argument("--seed", type=int, default=0, help="sample selection and ablation noise seed")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--vqa-mode", default="auto", choices=("auto", "choice", "text"),
                    help="auto: letter matching when the reference is a bare letter (A-H); choice: always; "
                         "text: never")
    ev.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ev.add_argument("--dtype", default=None,
                    help="bfloat16, float16 or float32 (or bf16, fp16, fp32); default: bfloat16 on cuda, float32 on cpu")
    ev.set_defaults(func=_eval)


def _eval(args) -> int:
    from vlmgraft.errors import VlmgraftError
    from vlmgraft.eval.runner import parse_tasks, run_eval
    from vlmgraft.model.common import DTYPES

    if args.dtype is not None and args.dtype not in DTYPES:
        raise VlmgraftError(f"--dtype {args.dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    tasks = parse_tasks(args.tasks)
    samples = []
    if any(t != "parity" for t in tasks):
        if not args.data:
            raise VlmgraftError(f"--tasks {args.tasks} needs --data (only parity runs without data)")
        from vlmgraft.data.spec import load_samples

        samples = load_samples(args.data, limit=args.limit, seed=args.seed)
    out = args.out or Path("eval_results") / Path(str(args.model).rstrip("/")).name
    run_eval(args.model, samples, tasks, out, llm=args.llm, batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens, vqa_mode=args.vqa_mode, device=args.device,
             dtype=DTYPES[args.dtype] if args.dtype else None, seed=args.seed)
    return 0
