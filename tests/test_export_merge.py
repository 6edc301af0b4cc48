"""`vlmgraft merge`: LoRA and DoRA fold into stock folders that compute what the PeftModel computed."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmgraft.cli import main
from vlmgraft.errors import VlmgraftError
from vlmgraft.export.checkpoints import resolve_checkpoint
from vlmgraft.export.merge import MergeOptions, merge
from vlmgraft.export.parity import logits_for, parity_inputs

TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def make_adapter_checkpoint(graft_dir, out, dora: bool, seed: int = 0):
    """What a finetune run saves: PEFT adapter + processor files + vlmgraft_checkpoint.json, adapters perturbed."""
    model = AutoModelForImageTextToText.from_pretrained(graft_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                  modules_to_save=["connector"], use_dora=dora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # fresh LoRA B is zero and DoRA magnitudes match the weights: perturb so merging matters
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(out)
    AutoProcessor.from_pretrained(graft_dir).save_pretrained(out)
    (out / "vlmgraft_checkpoint.json").write_text(json.dumps({"base_model": str(graft_dir), "stage": "finetune"}))
    return out


@pytest.fixture(scope="module")
def untied_graft(tiny_dir):
    from vlmgraft.graft.build import BuildOptions, build

    out = tiny_dir / "graft-qwen3-untied"
    if not out.exists():
        build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "qwen3-untied"), out=out),
              log=lambda *_: None)
    return out


@pytest.mark.parametrize("llm,dora", [("tied", False), ("tied", True), ("untied", True)])
def test_merged_folder_loads_stock_and_matches_the_peft_model(tiny_graft, untied_graft, tmp_path, llm, dora):
    graft = tiny_graft if llm == "tied" else untied_graft
    ckpt = make_adapter_checkpoint(graft, tmp_path / "ckpt", dora)
    report = merge(MergeOptions(source=str(ckpt), out=tmp_path / "merged", dtype="float32"), log=lambda *_: None)
    assert report["passed"] and report["merge_parity"]["adapter"] == ("DoRA" if dora else "LoRA")

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    assert processor.chat_template == AutoProcessor.from_pretrained(graft).chat_template
    batches = parity_inputs(processor)
    base = AutoModelForImageTextToText.from_pretrained(graft, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(ckpt)).eval()
    expected = logits_for(peft_model, batches)
    got = logits_for(merged, batches)
    for e, g in zip(expected, got, strict=True):
        assert (e - g).abs().max() <= 1e-4 * e.abs().max()
    with peft_model.disable_adapter():  # the base alone: merging must have changed what the model computes
        base_only = logits_for(peft_model, batches)
    assert max(float((b - g).abs().max()) for b, g in zip(base_only, got, strict=True)) > 1e-3

    tied = merged.config.tie_word_embeddings
    assert tied == (llm == "tied")
    assert (merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()) == tied
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_model" in k or "modules_to_save" in k or "base_layer" in k]
    assert "model.connector.modality_projection.proj.weight" in keys


def test_full_model_checkpoint_is_resaved_in_the_requested_dtype(tiny_graft, tmp_path):
    report = merge(MergeOptions(source=str(tiny_graft), out=tmp_path / "copy", dtype="float16"), log=lambda *_: None)
    assert report["kind"] == "full" and report["merge_parity"] is None and report["reload_parity"]["passed"]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "copy")
    assert model.dtype == torch.float16
    assert (tmp_path / "copy" / "merge_report.json").exists()


def _run_folder(tmp_path, graft):
    run = tmp_path / "run"
    run.mkdir()
    make_adapter_checkpoint(graft, run / "checkpoint-1", dora=False, seed=1)
    make_adapter_checkpoint(graft, run / "checkpoint-2", dora=False, seed=2)
    # Trainer records absolute paths; the run was trained somewhere else and moved here.
    state = {"best_model_checkpoint": "/elsewhere/run/checkpoint-1", "global_step": 2}
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    return run


def test_run_folder_checkpoint_selection_and_overwrite_guard(tiny_graft, tmp_path):
    run = _run_folder(tmp_path, tiny_graft)
    assert resolve_checkpoint(run, "best") == run / "checkpoint-1"
    assert resolve_checkpoint(run, "auto") == run / "checkpoint-1"
    assert resolve_checkpoint(run, "last") == run / "checkpoint-2"

    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out), "--checkpoint", "last", "--dtype", "float32"]) == 0
    assert json.loads((out / "merge_report.json").read_text())["checkpoint"] == str(run / "checkpoint-2")
    assert main(["merge", str(run), "--out", str(out)]) == 2  # exists: refused without --force
    assert json.loads((out / "merge_report.json").read_text())["checkpoint"] == str(run / "checkpoint-2")
    assert main(["merge", str(run), "--out", str(out), "--force"]) == 0
    assert json.loads((out / "merge_report.json").read_text())["checkpoint"] == str(run / "checkpoint-1")

    (run / "final").mkdir()
    assert resolve_checkpoint(run, "auto") == run / "final" == resolve_checkpoint(run, "last")
    with pytest.raises(VlmgraftError, match="overwrite the model being merged"):
        merge(MergeOptions(source=str(run / "checkpoint-1"), out=run / "checkpoint-1", force=True))
    assert (run / "checkpoint-1" / "adapter_config.json").exists()


def test_run_without_best_checkpoint_names_the_fix(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(VlmgraftError, match="--checkpoint last"):
        resolve_checkpoint(run, "best")


def test_restore_tying_reties_equal_heads_and_keeps_a_separately_trained_head(tiny_graft):
    from vlmgraft.export.merge import restore_tying

    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32)
    embeddings = model.get_input_embeddings().weight
    model.lm_head.weight = torch.nn.Parameter(embeddings.detach().clone())  # equal values, own storage
    assert restore_tying(model, tied=True).startswith("re-tied")
    assert model.lm_head.weight.data_ptr() == embeddings.data_ptr()

    model.lm_head.weight = torch.nn.Parameter(embeddings.detach() + 0.1)  # trained on its own (modules_to_save)
    assert restore_tying(model, tied=True).startswith("untied")
    assert model.config.tie_word_embeddings is False and not torch.equal(model.lm_head.weight, embeddings)
