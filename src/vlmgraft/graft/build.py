"""`vlmgraft build` and `vlmgraft audit`: load donor and LLM, graft, audit, save a stock transformers folder."""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    SmolVLMProcessor,
)

from vlmgraft import hub
from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.audit import AuditReport, run_audit
from vlmgraft.graft.families import family_for
from vlmgraft.graft.surgery import build_graft, plan_ledger
from vlmgraft.graft.template import extend_chat_template
from vlmgraft.graft.tokens import choose_vision_tokens

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
REPORT_NAME = "graft_report.json"


@dataclass
class BuildOptions:
    vision: str
    llm: str
    out: Path
    dtype: str = "bfloat16"
    force: bool = False
    image_token: str | None = None
    seed: int = 0
    device: str = "auto"  # where the audit's forward passes run: auto = CUDA when available


def inside_output(out: Path, source: Path) -> bool:
    """Whether deleting `out` would delete `source`: it is that folder or lies inside it."""
    out, source = out.expanduser().resolve(), source.expanduser().resolve()
    return out == source or out in source.parents


def guard_output(out: Path, force: bool) -> None:
    """Never overwrite a non-empty folder unless asked to."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise VlmgraftError(f"output folder {str(out)!r} already exists and is not empty; "
                                f"pass --force to overwrite it")
        shutil.rmtree(out)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise VlmgraftError(f"--dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_sources(vision: str, llm: str):
    donor_config = hub.load(AutoConfig.from_pretrained, vision, "vision donor")
    family = family_for(donor_config.model_type)
    donor = hub.load(AutoModelForImageTextToText.from_pretrained, vision, "vision donor", dtype=torch.float32)
    donor_processor = hub.load(AutoProcessor.from_pretrained, vision, "vision donor's processor")
    llm_model = hub.load(AutoModelForCausalLM.from_pretrained, llm, "LLM", dtype=torch.float32)
    return family, donor, donor_processor, llm_model


def make_processor(llm: str, donor_processor, donor_config, image_token: str | None):
    """The LLM's tokenizer (vision token names recorded, template extended) + the donor's image/video settings."""
    original = hub.load(AutoTokenizer.from_pretrained, llm, "LLM tokenizer")
    if not original.chat_template:
        raise VlmgraftError(f"the LLM tokenizer of {llm!r} has no chat_template; use an instruct/chat model or add "
                            f"a chat_template to its tokenizer_config.json")
    tokens = choose_vision_tokens(original.get_vocab(), original.eos_token, image_token)
    tokenizer = hub.load(AutoTokenizer.from_pretrained, llm, "LLM tokenizer", extra_special_tokens=tokens.as_dict())
    old_vocab = original.get_vocab()
    new_ids = sorted(tokenizer.convert_tokens_to_ids(t) for t in set(tokens.as_dict().values()) if t not in old_vocab)
    if tokenizer.pad_token is None:  # batching needs one; eos is safe because padding is always masked
        tokenizer.pad_token = tokenizer.eos_token
    template = extend_chat_template(original.chat_template, tokens.image_token, tokens.video_token)
    tokenizer.chat_template = template
    vision = donor_config.vision_config
    image_seq_len = (vision.image_size // vision.patch_size) ** 2 // donor_config.scale_factor**2
    processor = SmolVLMProcessor(image_processor=donor_processor.image_processor,
                                 video_processor=donor_processor.video_processor, tokenizer=tokenizer,
                                 image_seq_len=image_seq_len, chat_template=template)
    return processor, tokens, new_ids, len(original)


def _audit_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _peak_memory() -> dict:
    peak = {"cpu_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if torch.cuda.is_available():
        peak["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return peak


def build(opts: BuildOptions, log=print) -> AuditReport:
    start = time.perf_counter()
    out = Path(opts.out)
    dtype = _dtype(opts.dtype)
    guard_output(out, opts.force)
    family, donor, donor_processor, llm = load_sources(opts.vision, opts.llm)
    processor, tokens, new_ids, original_len = make_processor(opts.llm, donor_processor, donor.config,
                                                              opts.image_token)
    log(f"donor family {family.name}; image placeholder {tokens.image_token!r}"
        + (f"; added tokens {new_ids} (rows set to the mean embedding)" if new_ids else "; no tokens added"))
    image_token_id = processor.tokenizer.convert_tokens_to_ids(tokens.image_token)
    graft, ledger = build_graft(family, donor, llm, image_token_id, new_ids, len(processor.tokenizer), opts.seed)
    compare = [i for i in range(original_len) if i not in set(new_ids)]
    device = _audit_device(opts.device)
    graft.to(device)
    llm.to(device)
    report = run_audit(graft, processor, llm, family, ledger, set(donor.state_dict()), compare)
    log("audit:\n" + report.table())
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "vision": opts.vision, "llm": opts.llm, "family": family.name, "dtype": opts.dtype,
        "tokens": tokens.as_dict(), "image_token_id": image_token_id, "added_token_ids": new_ids,
        "image_seq_len": processor.image_seq_len, "tile_markers": "plain text (see vlmgraft.graft.tokens)",
        "parameters": {"total": sum(p.numel() for p in graft.parameters()),
                       "vision": sum(p.numel() for p in graft.get_submodule(family.vision).parameters()),
                       "connector": sum(p.numel() for p in graft.get_submodule(family.connector).parameters())},
        "audit": report.as_dict(), "ledger": ledger.as_dict(), "memory": _peak_memory(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if not report.passed:
        (out / REPORT_NAME).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        failed = [c.name for c in report.checks if not c.passed]
        raise VlmgraftError(f"graft audit failed ({', '.join(failed)}); nothing but {out / REPORT_NAME} was saved")
    graft.to("cpu", dtype)
    graft.config.dtype = dtype
    graft.save_pretrained(out)
    processor.save_pretrained(out)
    summary["memory"] = _peak_memory()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    (out / REPORT_NAME).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    log(f"saved {out} ({summary['parameters']['total'] / 1e6:.1f}M parameters, {opts.dtype}) in "
        f"{summary['seconds']} s")
    return report


def audit_folder(folder: str, vision: str, llm: str, log=print) -> AuditReport:
    """Re-run the audit on a saved graft against the donor and LLM it came from."""
    graft = hub.load(AutoModelForImageTextToText.from_pretrained, folder, "graft", dtype=torch.float32)
    processor = hub.load(AutoProcessor.from_pretrained, folder, "graft processor")
    family, donor, _, llm_model = load_sources(vision, llm)
    saved = json.loads((Path(folder) / "config.json").read_text())
    stored = DTYPES.get(str(saved.get("dtype") or saved.get("torch_dtype") or "float32"), torch.float32)
    # Compare like with like: the sources rounded to the dtype the graft was saved in.
    for model in (llm_model, donor):  # parameters only: buffers such as rotary inv_freq stay exact
        for param in model.parameters():
            param.data = param.data.to(stored).float()
    ledger = plan_ledger(family, list(donor.state_dict()), list(llm_model.state_dict()),
                         list(graft.state_dict()), bool(llm_model.config.tie_word_embeddings))
    saved_report = Path(folder) / REPORT_NAME
    added = json.loads(saved_report.read_text()).get("added_token_ids", []) if saved_report.exists() else []
    compare = [i for i in range(llm_model.get_input_embeddings().weight.shape[0]) if i not in set(added)]
    report = run_audit(graft, processor, llm_model, family, ledger, set(donor.state_dict()), compare)
    _check_values(report, graft, donor, llm_model, ledger, added)
    log("audit:\n" + report.table())
    return report


def _check_values(report: AuditReport, graft, donor, llm, ledger, added_ids: list[int]) -> None:
    """Copied tensors must still equal their sources (a trained or corrupted folder shows up here)."""
    graft_state, donor_state, llm_state = graft.state_dict(), donor.state_dict(), llm.state_dict()
    changed = []
    for target, source in ledger.copied.items():
        origin, key = source.split(":", 1)
        src = (donor_state if origin == "donor" else llm_state)[key]
        got = graft_state[target]
        if got.shape != src.shape or added_ids and got.dim() == 2 and got.shape[0] >= max(added_ids):
            keep = [i for i in range(src.shape[0]) if i not in set(added_ids)]
            got, src = got[keep], src[keep]
        if not torch.equal(got, src):
            changed.append(target)
    report.add("copied tensors equal sources", not changed,
               f"{len(ledger.copied) - len(changed)}/{len(ledger.copied)} equal"
               + (f"; differ: {changed[:4]}" if changed else ""))
