"""Run llama.cpp's own HF → GGUF converter on one folder, in a child process (`python -m vlmgraft.export.gguf_convert`).

The converter is imported from a llama.cpp tree (see `gguf_source`) with that tree's `gguf-py` first on sys.path, as
its convert_hf_to_gguf.py does: the converter and the gguf library it writes with change together, and the `gguf`
wheel installed next to vlmgraft may be older. A child process keeps that import, the converter's logging setup and
its model registry out of the caller's interpreter.

Written by hand here, and why (everything else, i.e. tensor names, hyper-parameters, quantisation, tokenizer metadata
and the Idefics3 projector, is llama.cpp's code):
- token renames: mtmd finds SmolVLM's image markers by their text, so a graft that reuses the LLM's own vision tokens
  for them has those ids renamed in the GGUF vocabulary, and no embedding row is added (`gguf_export` picks them);
- a pre-tokenizer fallback: llama.cpp recognises a BPE pre-tokenizer by hashing the ids a tokenizer gives a probe
  text, which only recognises published vocabularies; when the hash is unknown but tokenizer.json splits text with
  exactly the regex llama.cpp implements under a name, that name is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# tokenizer.json split regexes of the real checkpoints, by the llama.cpp pre-tokenizer name that implements them.
KNOWN_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
log = logging.getLogger("vlmgraft.gguf")


def known_pre_tokenizer(tokenizer_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer name for a byte-level BPE whose pre-tokenizer is one known regex split, else None."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    return KNOWN_SPLIT_REGEXES.get((split.get("pattern") or {}).get("Regex"))


def _graft_text_class(base, renames: dict[int, tuple[str, str]], folder: Path):
    class GraftText(base):
        model_arch = base.model_arch  # llama.cpp's TextModel wants it in every subclass's own body

        def get_vocab_base(self):
            tokens, toktypes, tokpre = super().get_vocab_base()
            for token_id, (old, new) in renames.items():
                if tokens[token_id] != old:
                    raise ValueError(f"token id {token_id} is {tokens[token_id]!r} in the converted vocabulary, "
                                     f"expected {old!r}")
                tokens[token_id] = new
            return tokens, toktypes, tokpre

        def get_vocab_base_pre(self, tokenizer):
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                tokenizer_json = folder / "tokenizer.json"
                name = known_pre_tokenizer(json.loads(tokenizer_json.read_text())) if tokenizer_json.exists() else None
                if name is None:
                    raise
                log.warning("vocabulary hash unknown to llama.cpp; tokenizer.json's split regex is %r's", name)
                return name

    return GraftText


def convert(tree: Path, part: str, folder: Path, outfile: Path, outtype: str, renames: dict[int, tuple[str, str]],
            name: str | None = None) -> None:
    sys.path.insert(0, str(tree / "gguf-py"))
    sys.path.insert(0, str(tree))
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    model_type = ModelType.MMPROJ if part == "mmproj" else ModelType.TEXT
    hparams = ModelBase.load_hparams(folder, False)
    arch = get_model_architecture(hparams, model_type)
    cls = get_model_class(arch, mmproj=part == "mmproj")
    if part == "text":
        cls = _graft_text_class(cls, renames, folder)
    with torch.inference_mode():
        model = cls(folder, ftype, outfile, model_name=name)
        model.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", required=True, type=Path, help="llama.cpp folder with convert_hf_to_gguf.py")
    parser.add_argument("--part", required=True, choices=("text", "mmproj"))
    parser.add_argument("--model", required=True, type=Path, help="the Hugging Face model folder to convert")
    parser.add_argument("--outfile", required=True, type=Path)
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES)
    parser.add_argument("--renames", default="{}", help='JSON {"id": ["old", "new"]}: token ids to rename')
    parser.add_argument("--name", default=None, help="general.name in the GGUF")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    renames = {int(k): (old, new) for k, (old, new) in json.loads(args.renames).items()}
    convert(args.tree, args.part, args.model, args.outfile, args.outtype, renames, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
