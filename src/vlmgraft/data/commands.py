"""CLI: `vlmgraft data inspect SPEC [--model DIR]` and `vlmgraft data shapes OUT --format ... --n N`."""

from __future__ import annotations

import sys
from pathlib import Path

SPEC_HELP = ("data SPEC: a file/folder (format detected), FORMAT:PATH (cauldron, swift, messages, coco), or a YAML "
             "mixture")


def register(sub) -> None:
    data = sub.add_parser("data", help="inspect data SPECs and write shapes-world data")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    inspect = data_sub.add_parser("inspect", help="counts, token lengths, loss mask and problems of a data SPEC")
    inspect.add_argument("spec", help=SPEC_HELP)
    inspect.add_argument("--model", default=None, help="graft folder: adds token lengths and rendered loss masks")
    inspect.add_argument("--limit", type=int, default=1000, help="decode at most this many samples (default 1000)")
    inspect.add_argument("--examples", type=int, default=2, help="rendered examples to show (default 2)")
    inspect.add_argument("--max-length", type=int, default=2048, help="max_length to check overflow against")
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                         help="loss mask as colour (trained bold, rest dim) or as ⟦trained⟧ brackets")
    inspect.set_defaults(func=_inspect)

    shapes = data_sub.add_parser("shapes", help="write synthetic shapes-world data in a reader format")
    shapes.add_argument("out", type=Path, help="output folder")
    shapes.add_argument("--format", required=True, choices=("cauldron", "swift", "messages", "coco"))
    shapes.add_argument("--n", type=int, default=100, help="number of scenes (default 100)")
    shapes.add_argument("--lang", choices=("zh", "en"), default="zh")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--task", default="mixed",
                        help="mixed, colour, shape, count, position, caption or grounding (not for coco)")
    shapes.add_argument("--image-size", type=int, default=64)
    shapes.add_argument("--max-shapes", type=int, default=3)
    shapes.add_argument("--noise", type=float, default=0.0)
    shapes.set_defaults(func=_shapes)


def _inspect(args) -> int:
    from vlmgraft.data.inspect import (
        inspect_spec,
        plain_example,
        problems_report,
        render_example,
        sources_table,
        token_report,
    )

    collator = processor = None
    if args.model:
        from transformers import AutoProcessor

        from vlmgraft import hub
        from vlmgraft.data.collate import VisionChatCollator

        processor = hub.load(AutoProcessor.from_pretrained, args.model, "graft processor")
        collator = VisionChatCollator(processor, max_length=args.max_length)
    result = inspect_spec(args.spec, limit=args.limit, seed=args.seed, collator=collator)
    print(sources_table(result))
    print()
    if collator is not None:
        image_id = collator.encoder.image_token_id
        print(token_report(result, image_id))
        color = args.color == "always" or args.color == "auto" and sys.stdout.isatty()
        shown = [e for e in result.encoded if e is not None][: args.examples]
        for n, encoded in enumerate(shown, 1):
            print(f"\nexample {n} ({encoded.origin}) — "
                  + ("bold: carries loss" if color else "⟦…⟧: carries loss") + ":")
            print(render_example(encoded, processor.tokenizer, image_id, color))
    else:
        for n, sample in enumerate(result.samples[: args.examples], 1):
            print(f"example {n} ({sample.origin}, {len(sample.images)} image(s)):\n{plain_example(sample)}")
        print("\n(pass --model GRAFT_DIR for token lengths and the loss mask)")
    print()
    print(problems_report(result))
    return 0


def _shapes(args) -> int:
    from vlmgraft.data.shapes import ShapesWorld
    from vlmgraft.data.shapes_io import TASKS
    from vlmgraft.errors import VlmgraftError

    if args.task not in TASKS:
        raise VlmgraftError(f"--task {args.task!r} is not one of {list(TASKS)}")
    if args.n < 1 or args.image_size < 16 or args.max_shapes < 1:
        raise VlmgraftError("--n and --max-shapes must be >= 1 and --image-size >= 16")
    world = ShapesWorld(image_size=args.image_size, max_shapes=args.max_shapes, noise=args.noise, seed=args.seed)
    path = world.write(args.out, args.format, args.n, lang=args.lang, task=args.task)
    print(f"wrote {args.n} {args.lang} scenes as {args.format}: {path}")
    return 0
