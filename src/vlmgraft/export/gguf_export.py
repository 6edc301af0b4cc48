"""`vlmgraft export gguf`: a SmolVLM-family graft as two llama.cpp files, `text.gguf` and `mmproj.gguf`.

llama.cpp runs a VLM as a plain causal LM plus an `mmproj` file (vision tower and connector) read by its `mtmd`
runtime. Both are written by llama.cpp's own converter (`gguf_convert`, run in a child process):
- text: the graft's `model.text_model.*` weights are staged as the plain causal-LM folder the LLM was
  (`model.*`, `lm_head` when untied, config from `text_config`, the graft's tokenizer), because llama.cpp maps a
  grafted folder's vision tensors but not its text ones;
- mmproj: the graft folder itself, through llama.cpp's Idefics3/SmolVLM projector.

mtmd frames every image with SmolVLM's marker tokens, found by their text (`<fake_token_around_image>`,
`<global-img>`, plus "\\n" and "\\n\\n"); grafts onto Qwen reuse Qwen's vision tokens for the first two
(`vlmgraft.graft.tokens`), so the text GGUF's vocabulary names those ids as mtmd expects: the ids, and so the
embedding rows the graft trained, stay the same. Tile markers (`<row_1_col_1>`) are plain text in both runtimes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlmgraft.errors import VlmgraftError
from vlmgraft.export import checkpoints
from vlmgraft.export.gguf_source import converter_tree
from vlmgraft.graft.build import guard_output

TEXT_FILE = "text.gguf"
MMPROJ_FILE = "mmproj.gguf"
REPORT = "gguf_export.json"
OUTTYPES = ("f16", "q8_0")
# The texts mtmd looks up for an Idefics3/SmolVLM image, by the processor attribute that holds the graft's token.
MTMD_MARKERS = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>"}
MTMD_NEWLINES = ("\n", "\n\n")
TEXT_PREFIX = "model.text_model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise VlmgraftError(f"{path}: cannot read the model config: {err}") from err


def _require_smolvlm(folder: Path, config: dict) -> None:
    if config.get("model_type") not in ("smolvlm", "idefics3"):
        raise VlmgraftError(f"GGUF export knows SmolVLM-family grafts only; {folder / 'config.json'} has "
                            f"model_type {config.get('model_type')!r}")


def _full_folder(ckpt: checkpoints.Checkpoint, staging: Path, log) -> Path:
    """The checkpoint as a full model folder: itself, or for an adapter its merge into the base."""
    if ckpt.kind == "full":
        return ckpt.folder
    log(f"merging the adapter in {ckpt.folder} into {ckpt.base}")
    model, processor, _ = checkpoints.load_model(ckpt.folder, dtype=checkpoints.stored_dtype(ckpt))
    folder = staging / "merged"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def stage_text_model(folder: Path, config: dict, dest: Path) -> dict:
    """Write the graft's language model as a plain causal-LM folder; returns {staged name: shape}."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    text = dict(config.get("text_config") or {})
    if not text.get("architectures"):
        raise VlmgraftError(f"{folder / 'config.json'}: text_config names no architectures; cannot tell llama.cpp "
                            f"which causal LM the graft's text model is")
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    text["tie_word_embeddings"] = tied
    dest.mkdir(parents=True)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise VlmgraftError(f"{str(folder)!r} holds no .safetensors weights")
    staged: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(TEXT_PREFIX):
                    tensors["model." + key.removeprefix(TEXT_PREFIX)] = weights.get_tensor(key)
                elif key == "lm_head.weight" and not tied:
                    tensors[key] = weights.get_tensor(key)
        if tensors:
            save_file(tensors, dest / shard.name, metadata={"format": "pt"})
            staged.update({name: tuple(t.shape) for name, t in tensors.items()})
    if not any(name.startswith("model.") for name in staged):
        raise VlmgraftError(f"{str(folder)!r} holds no {TEXT_PREFIX}* weights; is it a SmolVLM-family graft?")
    if not tied and "lm_head.weight" not in staged:
        raise VlmgraftError(f"{folder / 'config.json'}: tie_word_embeddings is false but no lm_head.weight is saved")
    (dest / "config.json").write_text(json.dumps(text, indent=2))
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
    return staged


def mtmd_renames(processor) -> dict[int, tuple[str, str]]:
    """Token ids whose GGUF name must change so that mtmd finds the graft's image markers: {id: (old, new)}."""
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    renames: dict[int, tuple[str, str]] = {}
    for attr, wanted in MTMD_MARKERS.items():
        have = getattr(processor, attr, None) or wanted
        if have == wanted:
            continue
        if wanted in vocab:
            raise VlmgraftError(f"the graft uses {have!r} as its {attr} but its vocabulary also holds {wanted!r} "
                                f"(id {vocab[wanted]}), the text mtmd looks up; renaming would make two tokens read "
                                f"alike")
        if have not in vocab:
            raise VlmgraftError(f"the graft's {attr} {have!r} is not in its tokenizer's vocabulary")
        renames[vocab[have]] = (have, wanted)
    return renames


def mtmd_differences(processor, config: dict) -> list[str]:
    """Where mtmd will prepare images differently from the graft's processor (it always tiles, at the tower's size)."""
    image_processor = getattr(processor, "image_processor", None)
    notes = []
    if image_processor is not None and not getattr(image_processor, "do_image_splitting", True):
        notes.append("the graft's processor does not split images into tiles, while mtmd always sends the tiles "
                     "and an overview")
    tile = (getattr(image_processor, "max_image_size", None) or {}).get("longest_edge")
    size = (config.get("vision_config") or {}).get("image_size")
    if tile and size and tile != size:
        notes.append(f"the graft's processor cuts {tile} px tiles, mtmd cuts tiles of the vision tower's "
                     f"image_size ({size} px)")
    return notes


def _missing_newlines(tokenizer) -> list[str]:
    """Newline runs mtmd looks up as one token each that this vocabulary splits (mtmd then has no id for them)."""
    return [text for text in MTMD_NEWLINES if len(tokenizer.encode(text, add_special_tokens=False)) != 1]


def _run_converter(tree: Path, part: str, folder: Path, outfile: Path, outtype: str,
                   renames: dict[int, tuple[str, str]], name: str) -> None:
    cmd = [sys.executable, "-m", "vlmgraft.export.gguf_convert", "--tree", str(tree), "--part", part,
           "--model", str(folder), "--outfile", str(outfile), "--outtype", outtype, "--name", name,
           "--renames", json.dumps({str(k): list(v) for k, v in renames.items()})]
    env = dict(os.environ)
    # The child imports vlmgraft from wherever this process did (an editable or a source checkout alike).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not outfile.is_file():
        raise VlmgraftError(f"llama.cpp's converter ({tree}) failed on the {part} part:\n"
                            f"{(done.stderr or done.stdout).strip()[-3000:]}")


def describe_gguf(path: Path) -> dict:
    """What a GGUF file holds, read back with the `gguf` library: architecture, tensor names and shapes."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else None
    # GGUF lists dimensions fastest-first; reversed they read like the PyTorch shapes.
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return {"architecture": arch, "tensors": len(shapes), "parameters": sum(_numel(s) for s in shapes.values()),
            "shapes": shapes}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def gguf_tokens(path: Path) -> list[str]:
    """The vocabulary stored in a GGUF file (`tokenizer.ggml.tokens`)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _check(text_file: Path, mmproj_file: Path, staged: dict, vision: dict, renames: dict) -> dict:
    """Read both files back: every staged tensor and every vision/connector tensor is there, ids renamed."""
    text, mmproj = describe_gguf(text_file), describe_gguf(mmproj_file)
    tokens = gguf_tokens(text_file)
    problems = []
    if text["parameters"] != sum(_numel(s) for s in staged.values()):
        problems.append(f"{TEXT_FILE} holds {text['parameters']} parameters, the graft's text model "
                        f"{sum(_numel(s) for s in staged.values())}")
    if text["tensors"] != len(staged):
        problems.append(f"{TEXT_FILE} holds {text['tensors']} tensors, the graft's text model {len(staged)}")
    if mmproj["parameters"] != sum(_numel(s) for s in vision.values()):
        problems.append(f"{MMPROJ_FILE} holds {mmproj['parameters']} parameters, the graft's vision tower and "
                        f"connector {sum(_numel(s) for s in vision.values())}")
    for token_id, (_, new) in renames.items():
        if tokens[token_id] != new:
            problems.append(f"{TEXT_FILE}: token {token_id} is {tokens[token_id]!r}, expected {new!r}")
    for new in MTMD_MARKERS.values():
        if new not in tokens:
            problems.append(f"{TEXT_FILE}: no token reads {new!r}, which mtmd looks up for every image")
    return {"text": {k: v for k, v in text.items() if k != "shapes"},
            "mmproj": {k: v for k, v in mmproj.items() if k != "shapes"}, "problems": problems}


def _vision_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(("model.vision_model.", "model.connector.")):
                    shapes[key] = tuple(weights.get_slice(key).get_shape())
    return shapes


def commands(out: Path) -> dict[str, str]:
    text, mmproj = out / TEXT_FILE, out / MMPROJ_FILE
    return {"image": f"llama-mtmd-cli -m {text} --mmproj {mmproj} --image IMAGE -p 'What is in the picture?'",
            "server": f"llama-server -m {text} --mmproj {mmproj}",
            "text only": f"llama-cli -m {text}"}


def export_gguf(source: str, out: Path, outtype: str = "f16", llama_cpp: str | None = None, force: bool = False,
                log=print) -> dict:
    start = time.perf_counter()
    out = Path(out)
    if outtype not in OUTTYPES:
        raise VlmgraftError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if Path(source).exists() and out.resolve() in (Path(source).resolve(), *Path(source).resolve().parents):
        raise VlmgraftError(f"--out {str(out)!r} would overwrite the model being exported; choose another folder")
    tree = converter_tree(llama_cpp)
    ckpt = checkpoints.describe(checkpoints.resolve_checkpoint(source))
    config_folder = ckpt.folder if ckpt.kind == "full" else Path(str(ckpt.base))
    if (config_folder / "config.json").is_file():
        _require_smolvlm(config_folder, _read_config(config_folder))
    guard_output(out, force)
    out.mkdir(parents=True, exist_ok=True)
    processor = checkpoints.load_processor(ckpt)
    renames = mtmd_renames(processor)
    missing = _missing_newlines(processor.tokenizer)
    if missing:
        raise VlmgraftError(f"the graft's tokenizer splits {', '.join(map(repr, missing))}, which mtmd looks up "
                            f"as one token each to frame SmolVLM images; llama.cpp could not run its images")
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=out) as staging:
        folder = _full_folder(ckpt, Path(staging), log)
        config = _read_config(folder)
        _require_smolvlm(folder, config)
        differences = mtmd_differences(processor, config)
        staged = stage_text_model(folder, config, Path(staging) / "text")
        name = Path(source).resolve().name
        log(f"converting the text model with {tree / 'convert_hf_to_gguf.py'} ({outtype})")
        _run_converter(tree, "text", Path(staging) / "text", out / TEXT_FILE, outtype, renames, name)
        log("converting the vision tower and connector (mmproj, f16)")
        _run_converter(tree, "mmproj", folder, out / MMPROJ_FILE, "f16", {}, name)
        check = _check(out / TEXT_FILE, out / MMPROJ_FILE, staged, _vision_shapes(folder), renames)
    report = {"source": str(ckpt.folder), "llama_cpp": str(tree), "outtype": outtype, "mmproj_outtype": "f16",
              "files": {"text": TEXT_FILE, "mmproj": MMPROJ_FILE},
              "renamed_tokens": {str(k): {"graft": old, "gguf": new} for k, (old, new) in renames.items()},
              **check, "mtmd_differences": differences, "commands": commands(out), "seconds": round(time.perf_counter() - start, 2)}
    (out / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if check["problems"]:
        raise VlmgraftError("the GGUF files do not hold what was converted: " + "; ".join(check["problems"]))
    for note in differences:
        log(f"warning: llama.cpp will not see images as this graft was trained to: {note}")
    for token_id, (old, new) in renames.items():
        log(f"token {token_id} {old!r} is named {new!r} in {TEXT_FILE}, as llama.cpp's mtmd expects")
    log(f"saved {TEXT_FILE} ({check['text']['tensors']} tensors), {MMPROJ_FILE} ({check['mmproj']['tensors']} "
        f"tensors) and {REPORT} to {out} in {report['seconds']} s")
    log("run it: " + report["commands"]["image"])
    return report
