"""Every audit check passes on a sound graft and fails on the defect it exists to catch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from vlmgraft.graft import audit
from vlmgraft.graft.build import audit_folder
from vlmgraft.graft.families import SMOLVLM


@pytest.fixture()
def parts(tiny_dir, tiny_graft):
    graft = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32)
    llm = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen3", dtype=torch.float32)
    for param in llm.parameters():  # compare with the LLM as rounded into the saved bf16 graft
        param.data = param.data.to(torch.bfloat16).float()
    return graft, AutoProcessor.from_pretrained(tiny_graft), llm


def _checks(report):
    return {c.name: c.passed for c in report.checks}


def test_sound_graft_passes_every_check(parts):
    graft, processor, llm = parts
    report = audit.run_audit(graft, processor, llm, SMOLVLM, None, None)
    assert report.passed, report.table()
    assert len(report.checks) == 9


def test_image_token_patched_on_one_level_only_is_caught(parts):
    graft, processor, llm = parts
    graft.model.image_token_id = graft.config.image_token_id + 1  # the seeds' silent failure
    report = audit.AuditReport()
    audit.check_configs(report, graft, processor, llm.config, llm.generation_config)
    assert _checks(report)["image_token_id agrees"] is False


def test_changed_llm_weights_break_text_parity(parts):
    graft, processor, llm = parts
    with torch.no_grad():
        graft.model.text_model.layers[0].mlp.down_proj.weight.mul_(1.01)
    report = audit.AuditReport()
    audit.check_text_parity(report, graft, llm, processor.tokenizer)
    assert _checks(report)["text-only logits = LLM"] is False


def test_a_graft_blind_to_images_is_caught(parts):
    graft, processor, _ = parts
    with torch.no_grad():
        graft.model.connector.modality_projection.proj.weight.zero_()
    report = audit.AuditReport()
    audit.check_image_effect(report, graft, processor)
    assert _checks(report)["images change the output"] is False


def test_connector_cut_from_the_graph_is_caught(parts):
    graft, processor, _ = parts
    graft.model.connector.modality_projection.proj.weight.requires_grad_(False)
    report = audit.AuditReport()
    audit.check_connector_gradient(report, graft, processor, SMOLVLM)
    assert _checks(report)["connector receives gradient"] is False


def test_placeholder_count_mismatch_is_caught(parts):
    graft, processor, _ = parts
    processor.image_seq_len += 1
    report = audit.AuditReport()
    audit.check_placeholders(report, graft, processor)
    assert _checks(report)["placeholders = image features"] is False


def test_unexplained_tensor_is_caught(tiny_dir, parts):
    graft, _, llm = parts
    from vlmgraft.graft.surgery import plan_ledger

    donor_keys = list(AutoModelForImageTextToText.from_pretrained(tiny_dir / "donor").state_dict())
    ledger = plan_ledger(SMOLVLM, donor_keys, list(llm.state_dict()), list(graft.state_dict()), True)
    report = audit.AuditReport()
    audit.check_ledger(report, ledger, set(graft.state_dict()) | {"model.extra.weight"}, set(donor_keys),
                       set(llm.state_dict()))
    assert _checks(report)["weights accounted"] is False


def test_audit_command_on_folder_passes_then_catches_a_changed_vision_weight(tiny_dir, tiny_graft, tmp_path):
    import shutil

    report = audit_folder(str(tiny_graft), str(tiny_dir / "donor"), str(tiny_dir / "qwen3"), log=lambda *_: None)
    assert report.passed, report.table()
    copy = tmp_path / "copy"
    shutil.copytree(tiny_graft, copy)
    weights = load_file(copy / "model.safetensors")
    key = "model.vision_model.encoder.layers.0.mlp.fc1.weight"
    weights[key] = weights[key] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    broken = audit_folder(str(copy), str(tiny_dir / "donor"), str(tiny_dir / "qwen3"), log=lambda *_: None)
    assert _checks(broken)["copied tensors equal sources"] is False
