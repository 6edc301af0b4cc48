"""What a training output is: pick the checkpoint a run folder means, tell adapters from full models, load either.

A run folder holds `checkpoint-N/` folders and, once finished, `final/`. Each is a full stock model folder (stages
align, align-head, full) or a PEFT adapter folder (finetune) whose base is named in `vlmgraft_checkpoint.json` (or,
failing that, in `adapter_config.json`). `load_model` turns any of them into a plain transformers model, so merge,
ONNX export, chat and evaluation accept a graft folder, a merged folder, a checkpoint or a whole run alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmgraft import hub
from vlmgraft.errors import VlmgraftError

ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_META = "vlmgraft_checkpoint.json"  # written by vlmgraft.train.callbacks.CheckpointMetadata
TRAINER_STATE = "trainer_state.json"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
CHOICES = ("auto", "best", "last")


@dataclass
class Checkpoint:
    folder: Path
    kind: str  # "adapter" or "full"
    base: str | None = None  # the model an adapter applies to
    meta: dict = field(default_factory=dict)

    def processor_source(self) -> str:
        """Processor files travel with checkpoints; an adapter folder without them falls back to its base."""
        if any((self.folder / name).exists() for name in PROCESSOR_FILES) or self.kind == "full":
            return str(self.folder)
        return str(self.base)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VlmgraftError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err


def _numbered_checkpoints(run: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists() and (
        (path / "final").is_dir() or bool(_numbered_checkpoints(path)))


def _best_checkpoint(run: Path, numbered: list[Path]) -> Path | None:
    """`best_model_checkpoint` from the run's trainer state (the newest one that records it)."""
    states = [run / TRAINER_STATE] + [p / TRAINER_STATE for p in reversed(numbered)]
    for state in states:
        if not state.exists():
            continue
        best = _read_json(state).get("best_model_checkpoint")
        if best:
            # The run may have moved since training: trust the folder name, look for it in this run.
            for candidate in (Path(best), run / Path(best).name):
                if candidate.is_dir():
                    return candidate
            raise VlmgraftError(f"{state}: best_model_checkpoint {best!r} no longer exists in {run}")
    return None


def resolve_checkpoint(path: str | Path, which: str = "auto") -> Path:
    """The checkpoint folder meant by `path`: the folder itself, or for a run folder `final/`, best or newest.

    which: "auto" = final/ if present, else the best checkpoint if recorded, else the newest;
    "best" = the recorded best checkpoint (error if none); "last" = final/ if present, else the newest checkpoint.
    """
    path = Path(path).expanduser()
    if which not in CHOICES:
        raise VlmgraftError(f"--checkpoint {which!r} is not one of {', '.join(CHOICES)}")
    if not path.exists():
        raise VlmgraftError(f"{str(path)!r} does not exist")
    if not is_run_folder(path):
        return path
    numbered = _numbered_checkpoints(path)
    final = path / "final"
    if which == "best":
        best = _best_checkpoint(path, numbered)
        if best is None:
            raise VlmgraftError(f"run {str(path)!r} records no best_model_checkpoint in its {TRAINER_STATE} files "
                                f"(training without evaluation keeps none); use --checkpoint last")
        return best
    if final.is_dir():
        return final
    if which == "auto":
        best = _best_checkpoint(path, numbered)
        if best is not None:
            return best
    return numbered[-1]


def describe(folder: str | Path, base: str | None = None) -> Checkpoint:
    """Adapter or full model, and for an adapter the base it applies to (`base` overrides what is recorded)."""
    folder = Path(folder)
    meta = _read_json(folder / CHECKPOINT_META) if (folder / CHECKPOINT_META).exists() else {}
    if (folder / ADAPTER_CONFIG).exists():
        recorded = meta.get("base_model") or _read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
        base = base or recorded
        if not base:
            raise VlmgraftError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path, and no {CHECKPOINT_META}; "
                                f"pass --base with the graft folder the run started from")
        if not hub.is_local(base) and (folder / base).is_dir():
            base = str(folder / base)
        return Checkpoint(folder, "adapter", base, meta)
    if (folder / "config.json").exists():
        return Checkpoint(folder, "full", None, meta)
    raise VlmgraftError(f"{str(folder)!r} is neither a model folder (config.json), a PEFT adapter folder "
                        f"({ADAPTER_CONFIG}) nor a run folder (checkpoint-N/ or final/)")


def stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype the model's weights are saved in (an adapter's base decides for it)."""
    folder = Path(ckpt.base if ckpt.kind == "adapter" else ckpt.folder)
    config = _read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32


def load_processor(ckpt: Checkpoint):
    from transformers import AutoProcessor

    return hub.load(AutoProcessor.from_pretrained, ckpt.processor_source(), "processor")


def load_full(folder: str, dtype: torch.dtype = torch.float32, **kwargs):
    from transformers import AutoModelForImageTextToText

    return hub.load_model(AutoModelForImageTextToText.from_pretrained, folder, "model", dtype=dtype, **kwargs).eval()


def load_adapter(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, **kwargs):
    """The base model with the adapter applied, unmerged (a `PeftModel`)."""
    from peft import PeftModel

    base = load_full(ckpt.base, dtype, **kwargs)
    try:
        return PeftModel.from_pretrained(base, str(ckpt.folder)).eval()
    except (KeyError, ValueError, RuntimeError) as err:
        raise VlmgraftError(f"the adapter in {str(ckpt.folder)!r} does not fit its base {ckpt.base!r}: {err}") from err


def load_model(path: str | Path, which: str = "auto", dtype: torch.dtype = torch.float32, base: str | None = None,
               device: str | torch.device = "cpu", **kwargs):
    """Any model folder, checkpoint or run → (plain transformers model with adapters merged, processor, Checkpoint)."""
    ckpt = describe(resolve_checkpoint(path, which), base)
    if ckpt.kind == "adapter":
        # Merge in fp32 and cast afterwards: merging straight into bf16 weights rounds the LoRA update away.
        model = load_adapter(ckpt, torch.float32, **kwargs).merge_and_unload().to(dtype)
    else:
        model = load_full(str(ckpt.folder), dtype, **kwargs)
    return model.to(device), load_processor(ckpt), ckpt


def llm_of(model_dir: str | Path) -> str | None:
    """The causal LM a graft was built from: its graft_report.json, else the report of the base it came from."""
    seen: set[Path] = set()
    folder: Path | None = Path(model_dir)
    if is_run_folder(folder):
        folder = resolve_checkpoint(folder)
    while folder is not None and folder not in seen and folder.is_dir():
        seen.add(folder)
        report = folder / "graft_report.json"
        if report.exists():
            return _read_json(report).get("llm")
        following = None
        for name, key in (("merge_report.json", "base_model"), (CHECKPOINT_META, "base_model"),
                          (ADAPTER_CONFIG, "base_model_name_or_path")):
            if (folder / name).exists() and _read_json(folder / name).get(key):
                following = Path(_read_json(folder / name)[key])
                break
        folder = following
    return None
