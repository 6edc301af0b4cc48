"""The one command line: `vlmgraft build|audit|data|train|merge|chat|detect|serve|webui|eval|export|demo`.

Each pipeline folder contributes its sub-commands through a `register(subparsers)` function; heavy imports happen
only inside the command that needs them, so `vlmgraft --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from vlmgraft.errors import VlmgraftError

# Modules that add sub-commands; each must import without optional extras (commands import those when they run).
COMMAND_MODULES = ("vlmgraft.graft.commands", "vlmgraft.fixtures.commands", "vlmgraft.data.commands", "vlmgraft.train.commands",
                   "vlmgraft.export.commands", "vlmgraft.infer.commands", "vlmgraft.eval.commands",
                   "vlmgraft.demo")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmgraft", description="Give any language model eyes.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as err:  # a broken install or a bug: never hide a command
            raise ImportError(f"vlmgraft's command module {name} does not import: {err}") from err
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return int(args.func(args) or 0)
    except VlmgraftError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
