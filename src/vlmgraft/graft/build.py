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
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PretrainedConfig,
    SmolVLMProcessor,
)

from vlmgraft import hub
from vlmgraft.errors import VlmgraftError
from vlmgraft.graft import exaone, llava
from vlmgraft.graft.audit import AuditReport, run_audit
from vlmgraft.graft.families import EXAONE4_5, LLAVA, donor_family_for
from vlmgraft.graft.naflex import NAFLEX_TYPES, convert_naflex
from vlmgraft.graft.surgery import build_graft, graft_config, plan_ledger, smolvlm_connector_init, vocab_size_for
from vlmgraft.graft.template import extend_chat_template
from vlmgraft.graft.tokens import choose_vision_tokens
from vlmgraft.model.common import DTYPES
from vlmgraft.model.common import image_seq_len as config_image_seq_len

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
    image_size: int | None = None  # SigLIP2 NaFlex donors: the fixed resolution to convert to (None: native grid)


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


def _dtype_name(config) -> str | None:
    """The dtype a checkpoint's config.json says its weights are stored in (None when it does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(value).removeprefix("torch.") if value is not None else None


def set_config_dtype(config: PretrainedConfig, dtype: torch.dtype) -> None:
    """Name `dtype` in the config and every config nested in it (text_config, vision_config, ...): transformers
    reads a nested one when that part is loaded on its own, so all of them must agree with the saved weights."""
    config.dtype = dtype
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            set_config_dtype(value, dtype)


def downcast_note(sources: dict[str, str | None], dtype: str) -> str | None:
    """One line naming the sources whose stored weights are wider than the dtype the graft is saved in."""
    target = _dtype(dtype)
    wider = {name: stored for name, stored in sources.items()
             if stored in DTYPES and DTYPES[stored].itemsize > target.itemsize}
    if not wider:
        return None
    listed = ", ".join(f"{name} {stored}" for name, stored in wider.items())
    return (f"down-casting to {str(target).removeprefix('torch.')}: {listed} "
            f"(--dtype {next(iter(wider.values()))} keeps full precision)")


def load_sources(vision: str, llm: str, image_size: int | None = None):
    """(family, donor in fp32, its processor — the image processor alone for SigLIP/CLIP —, LLM in fp32, the NaFlex
    conversion report or None). A SigLIP2 NaFlex donor comes back converted to the fixed-resolution SigLIP layout."""
    donor_config = hub.load(AutoConfig.from_pretrained, vision, "vision donor")
    family = donor_family_for(donor_config.model_type)
    naflex = donor_config.model_type in NAFLEX_TYPES
    if image_size is not None and not naflex:
        raise VlmgraftError(f"--image-size is for SigLIP2 NaFlex donors; {vision!r} is a fixed-resolution "
                            f"{donor_config.model_type!r} donor")
    conversion = None
    if family is LLAVA:  # a dual encoder or a vision tower: no VLM head class, and its text tokenizer is not needed
        donor = hub.load_model(AutoModel.from_pretrained, vision, "vision donor", dtype=torch.float32)
        donor_processor = hub.load(AutoImageProcessor.from_pretrained, vision, "vision donor's image processor")
        if naflex:
            donor, donor_processor, conversion = convert_naflex(donor, donor_processor, image_size)
    else:
        donor = hub.load_model(AutoModelForImageTextToText.from_pretrained, vision, "vision donor", dtype=torch.float32)
        donor_processor = hub.load(AutoProcessor.from_pretrained, vision, "vision donor's processor")
    llm_model = hub.load_model(AutoModelForCausalLM.from_pretrained, llm, "LLM", dtype=torch.float32)
    return family, donor, donor_processor, llm_model, conversion


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
    processor = SmolVLMProcessor(image_processor=donor_processor.image_processor,
                                 video_processor=donor_processor.video_processor, tokenizer=tokenizer,
                                 image_seq_len=config_image_seq_len(donor_config), chat_template=template)
    return processor, tokens.as_dict(), new_ids, len(original)


def _graft_parts(family, opts: BuildOptions, donor, donor_processor, llm):
    """The family's processor, outer config and connector init: (processor, tokens, new_ids, original_len, config,
    init)."""
    if family is LLAVA:
        processor, tokens, new_ids, original_len = llava.make_processor(opts.llm, donor_processor, donor.config,
                                                                        opts.image_token)
    elif family is EXAONE4_5:
        processor, tokens, new_ids, original_len = exaone.make_processor(opts.llm, opts.vision, donor_processor,
                                                                         opts.image_token)
    else:
        processor, tokens, new_ids, original_len = make_processor(opts.llm, donor_processor, donor.config,
                                                                  opts.image_token)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    vocab = vocab_size_for(llm, len(processor.tokenizer))
    if family is LLAVA:
        config = llava.llava_config(donor.config, llm.config, image_token_id, vocab)
        init = llava.projector_init(llava.feature_rms(donor, donor_processor, config, opts.seed))
    elif family is EXAONE4_5:
        video_token_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
        config = exaone.exaone_config(donor.config, llm.config, image_token_id, video_token_id, vocab)
        init = exaone.merger_output_init(exaone.merger_hidden_rms(donor, donor_processor, opts.seed))
    else:
        config, init = graft_config(donor.config, llm.config, image_token_id, vocab), smolvlm_connector_init
    return processor, tokens, new_ids, original_len, config, init


def image_seq_len(graft, processor) -> int | dict:
    """Image tokens per image (SmolVLM: per tile), as the saved config and processor define it; Exaone: the range
    the image size gives."""
    if hasattr(processor, "image_seq_len"):
        return processor.image_seq_len
    if hasattr(graft.config, "image_seq_length"):
        return graft.config.image_seq_length
    return exaone.token_range(processor)


def _family_details(family, config, ledger, conversion) -> dict:
    """What graft_report.json says about how the family reads and places image features."""
    if family is LLAVA:
        details = {"vision_feature_select_strategy": config.vision_feature_select_strategy,
                   "vision_feature_layer": config.vision_feature_layer}
    elif family is EXAONE4_5:
        details = {"connector": exaone.connector_split(ledger),
                   "text_positions": "1-D (Exaone4.5 does not use Qwen2.5-VL's M-RoPE)"}
    else:
        details = {"tile_markers": "plain text (see vlmgraft.graft.tokens)"}
    return {**details, **({"naflex_conversion": conversion} if conversion else {})}


def _group_sizes(graft, family) -> dict:
    """Parameters per module group (by the family's longest-prefix rule: Exaone's merger is not 'vision')."""
    sizes = {"total": 0, "vision": 0, "connector": 0}
    for name, param in graft.named_parameters():
        sizes["total"] += param.numel()
        group = family.group_of(name)
        if group in sizes:
            sizes[group] += param.numel()
    return sizes


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
    family, donor, donor_processor, llm, conversion = load_sources(opts.vision, opts.llm, opts.image_size)
    if conversion:
        log(f"SigLIP2 NaFlex donor converted to fixed-resolution SigLIP at {conversion['image_size']} px "
            f"(max |Δ|/RMS vs Siglip2VisionModel {conversion['max_rel_diff_vs_siglip2']:.1e})")
    processor, tokens, new_ids, original_len, config, init = _graft_parts(family, opts, donor, donor_processor, llm)
    sources = {"vision donor": _dtype_name(hub.load(AutoConfig.from_pretrained, opts.vision, "vision donor")),
               "LLM": _dtype_name(hub.load(AutoConfig.from_pretrained, opts.llm, "LLM"))}
    log(f"donor {donor.config.model_type} → {family.export_architecture}; image placeholder {processor.image_token!r}"
        + (f"; added tokens {new_ids} (rows set to the mean embedding)" if new_ids else "; no tokens added"))
    image_token_id = config.image_token_id
    graft, ledger = build_graft(family, donor, llm, config, new_ids, len(processor.tokenizer), opts.seed, init)
    compare = [i for i in range(original_len) if i not in set(new_ids)]
    device = _audit_device(opts.device)
    graft.to(device)
    llm.to(device)
    report = run_audit(graft, processor, llm, family, ledger, set(donor.state_dict()), compare)
    log("audit:\n" + report.table())
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "vision": opts.vision, "llm": opts.llm, "family": family.name, "donor_model_type": donor.config.model_type,
        "architecture": family.export_architecture, "dtype": opts.dtype, "source_dtypes": sources,
        "tokens": tokens, "image_token_id": image_token_id, "added_token_ids": new_ids,
        "image_seq_len": image_seq_len(graft, processor),
        **_family_details(family, config, ledger, conversion),
        "parameters": _group_sizes(graft, family),
        "audit": report.as_dict(), "ledger": ledger.as_dict(), "memory": _peak_memory(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if not report.passed:
        (out / REPORT_NAME).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        failed = [c.name for c in report.checks if not c.passed]
        raise VlmgraftError(f"graft audit failed ({', '.join(failed)}); nothing but {out / REPORT_NAME} was saved")
    graft.to("cpu", dtype)
    set_config_dtype(graft.config, dtype)
    note = downcast_note(sources, opts.dtype)
    if note:
        log(note)
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
    graft = hub.load_model(AutoModelForImageTextToText.from_pretrained, folder, "graft", dtype=torch.float32)
    processor = hub.load(AutoProcessor.from_pretrained, folder, "graft processor")
    saved = json.loads((Path(folder) / "config.json").read_text())
    donor_type = hub.load(AutoConfig.from_pretrained, vision, "vision donor").model_type
    size = saved["vision_config"]["image_size"] if donor_type in NAFLEX_TYPES else None  # convert as the build did
    family, donor, _, llm_model, _ = load_sources(vision, llm, size)
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
