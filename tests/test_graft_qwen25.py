"""Qwen2.5-VL donors → stock Exaone4_5_ForConditionalGeneration: build, audit, stock reload, exact LLM, kept ViT."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from vlmgraft.fixtures.qwen_vl import TINY_MAX_PIXELS, TINY_MIN_PIXELS, save_tiny_qwen25_vl
from vlmgraft.graft.build import BuildOptions, audit_folder, build
from vlmgraft.graft.families import EXAONE4_5, GROUPS, family_for

QUIET = {"log": lambda *_: None}
LLMS = ("qwen3", "qwen3-untied", "llama3")
REINITIALISED = {"model.visual.merger.mlp.2.weight", "model.visual.merger.mlp.2.bias"}


@pytest.fixture(scope="module")
def donor(tmp_path_factory):
    return save_tiny_qwen25_vl(tmp_path_factory.mktemp("qwen25vl") / "donor")


@pytest.fixture(scope="module")
def grafts(donor, tiny_dir, tmp_path_factory):
    """The donor onto each tiny LLM, saved in float32 so that reloaded tensors compare exactly."""
    root = tmp_path_factory.mktemp("exaone-grafts")
    for llm in LLMS:
        assert build(BuildOptions(vision=str(donor), llm=str(tiny_dir / llm), out=root / llm, dtype="float32"),
                     **QUIET).passed
    return {llm: root / llm for llm in LLMS}


def _image_batch(processor, images, question="What colour is it?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True)


def _added_ids(folder) -> list[int]:
    return json.loads((folder / "graft_report.json").read_text())["added_token_ids"]


def test_fixture_is_laid_out_like_the_hub_checkpoint(donor):
    names = {p.name for p in donor.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "video_preprocessor_config.json",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    settings = json.loads((donor / "preprocessor_config.json").read_text())
    assert (settings["min_pixels"], settings["max_pixels"]) == (TINY_MIN_PIXELS, TINY_MAX_PIXELS)
    model = AutoModelForImageTextToText.from_pretrained(donor)
    processor = AutoProcessor.from_pretrained(donor)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                             "text": "hi"}]}])
    assert "<|vision_start|><|image_pad|><|vision_end|>hi" in text
    assert max(model.config.vision_config.fullatt_block_indexes) < model.config.vision_config.depth


@pytest.mark.parametrize("llm", LLMS)
def test_build_reloads_as_stock_exaone_with_the_llm_exact(llm, donor, grafts, tiny_dir):
    out = grafts[llm]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Exaone4_5_ForConditionalGeneration"] and "auto_map" not in config
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / llm)
    assert type(model).__name__ == "Exaone4_5_ForConditionalGeneration"
    assert type(processor).__name__ == "Exaone4_5_Processor" and processor.video_processor is not None
    assert type(model.model.language_model) is type(base.model)
    vision = model.config.vision_config
    assert vision.num_key_value_heads == vision.num_heads and vision.out_hidden_size == base.config.hidden_size
    assert model.config.tie_word_embeddings == base.config.tie_word_embeddings
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (TINY_MIN_PIXELS, TINY_MAX_PIXELS)

    original = AutoTokenizer.from_pretrained(tiny_dir / llm)
    added = _added_ids(out)
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    assert (model.config.image_token_id, model.config.video_token_id) == tuple(ids.values())
    assert (processor.image_token_id, processor.video_token_id) == tuple(ids.values())
    if llm.startswith("qwen3"):  # the LLM's own reserved tokens: nothing added
        assert added == [] and ids == {t: original.convert_tokens_to_ids(t) for t in ids}
    else:
        assert sorted(ids.values()) == added and not set(added) & set(original.get_vocab().values())

    # Every LLM tensor, q/k-norm included, is the LLM's own (rows of added tokens aside).
    graft_state = model.state_dict()
    for key, value in base.state_dict().items():
        target = "model.language_model." + key[len("model."):] if key.startswith("model.") else key
        got = graft_state[target]
        if added and got.dim() == 2 and got.shape[0] >= value.shape[0]:
            keep = [i for i in range(value.shape[0]) if i not in added]
            got, value = got[keep], value[keep]
        assert torch.equal(got, value), key
    if llm.startswith("qwen3"):
        assert any(".q_norm." in k for k in base.state_dict()) and any(".k_norm." in k for k in base.state_dict())
    # Every kept vision tensor (the ViT, ln_q and the merger's first layer) is the donor's own.
    donor_state = AutoModelForImageTextToText.from_pretrained(donor).state_dict()
    kept = [k for k in graft_state if k.startswith("model.visual.") and k not in REINITIALISED]
    assert "model.visual.merger.mlp.0.weight" in kept and "model.visual.merger.ln_q.weight" in kept
    for key in kept:
        assert torch.equal(graft_state[key], donor_state[key]), key

    model.eval()
    with torch.no_grad():
        chat = processor.tokenizer.apply_chat_template([{"role": "user", "content": "天空是什么颜色？"}],
                                                       add_generation_prompt=True, return_tensors="pt")
        chat = chat["input_ids"] if not torch.is_tensor(chat) else chat
        columns = [i for i in range(len(original)) if i not in added]
        assert torch.equal(model(input_ids=chat).logits[..., columns], base(input_ids=chat).logits[..., columns])
        batch = _image_batch(processor, [Image.new("RGB", (40, 56), "red"), Image.new("RGB", (40, 56), "blue")])
        logits = model(**batch).logits[:, -1]
        features = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    assert (logits[0] - logits[1]).abs().max() > 1e-6
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == sum(f.shape[0] for f in features)


def test_chat_template_wraps_images_like_qwen_and_keeps_text_turns(grafts, tiny_dir):
    processor = AutoProcessor.from_pretrained(grafts["qwen3"])
    original = AutoTokenizer.from_pretrained(tiny_dir / "qwen3")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|>Hi" in processor.apply_chat_template(messages)
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}]
    assert "<|vision_start|><|video_pad|><|vision_end|>Hi" in processor.apply_chat_template(video)
    text_only = [{"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(text_only, add_generation_prompt=True) == \
        original.apply_chat_template(text_only, add_generation_prompt=True, tokenize=False)
    # An LLM without the vision markers gets the placeholder alone (no untrained marker rows).
    llama = AutoProcessor.from_pretrained(grafts["llama3"])
    assert "<|vision_start|>" not in llama.apply_chat_template(messages)


def test_report_accounts_for_every_donor_tensor_and_splits_the_merger(donor, grafts):
    report = json.loads((grafts["qwen3"] / "graft_report.json").read_text())
    assert report["audit"]["passed"] and report["architecture"] == "Exaone4_5_ForConditionalGeneration"
    assert report["family"] == "exaone4_5" and "M-RoPE" in report["text_positions"]
    ledger = report["ledger"]
    donor_keys = set(AutoModelForImageTextToText.from_pretrained(donor).state_dict())
    assert len(donor_keys) == len(load_file(donor / "model.safetensors"))
    accounted = {v.split(":", 1)[1] for v in ledger["copied"].values() if v.startswith("donor:")}
    accounted |= {k.split(":", 1)[1] for k in ledger["dropped"] if k.startswith("donor:")}
    assert accounted == donor_keys
    dropped = ledger["dropped"]
    assert all("replaced by the LLM" in r for k, r in dropped.items()
               if k.startswith(("donor:model.language_model.", "donor:lm_head.")))
    assert {"donor:model.visual.merger.mlp.2.weight", "donor:model.visual.merger.mlp.2.bias"} <= set(dropped)
    assert set(ledger["reinitialised"]) == REINITIALISED
    assert report["connector"]["reinitialised"] == sorted(REINITIALISED)
    assert report["connector"]["kept_from_donor"] == sorted(
        f"model.visual.merger.{k}" for k in ("ln_q.weight", "mlp.0.weight", "mlp.0.bias"))
    assert {c["name"] for c in report["audit"]["checks"]} >= {"vision settings agree", "placeholders = image features"}


def _merger_input(visual, batch) -> torch.Tensor:
    seen = []
    handle = visual.merger.mlp[2].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    handle.remove()
    return seen[0]


def test_vision_features_before_the_new_layer_equal_the_donors(donor, grafts):
    """Same ViT and kept merger layers: what the re-initialised output layer reads is the donor's exactly."""
    graft = AutoModelForImageTextToText.from_pretrained(grafts["qwen3"])
    source = AutoModelForImageTextToText.from_pretrained(donor)
    processor = AutoProcessor.from_pretrained(grafts["qwen3"])
    batch = processor.image_processor(images=[Image.effect_noise((80, 48), 60).convert("RGB")], return_tensors="pt")
    assert torch.equal(_merger_input(graft.model.visual, batch), _merger_input(source.model.visual, batch))


def test_image_tokens_enter_at_the_llms_embedding_scale(grafts):
    for llm in ("qwen3", "llama3"):
        model = AutoModelForImageTextToText.from_pretrained(grafts[llm])
        processor = AutoProcessor.from_pretrained(grafts[llm])
        batch = processor.image_processor(images=[Image.effect_noise((64, 64), 60).convert("RGB")],
                                          return_tensors="pt")
        with torch.no_grad():
            features = torch.cat(model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
                                 .pooler_output)
        ratio = features.pow(2).mean().sqrt() / model.get_input_embeddings().weight.pow(2).mean().sqrt()
        assert 0.3 < ratio < 3, f"{llm}: image features at {ratio:.2f}× the embedding RMS"


def test_saved_folder_passes_vlmgraft_audit(donor, grafts, tiny_dir):
    report = audit_folder(str(grafts["qwen3-untied"]), str(donor), str(tiny_dir / "qwen3-untied"), **QUIET)
    assert report.passed
    assert any(c.name == "copied tensors equal sources" and c.passed for c in report.checks)


def test_module_groups_put_the_merger_in_the_connector_and_lora_stays_off_the_vit(grafts):
    from vlmgraft.train.config import TrainConfig
    from vlmgraft.train.stages import prepare_model

    model = AutoModelForImageTextToText.from_pretrained(grafts["qwen3-untied"])
    assert family_for(model.config.model_type) is EXAONE4_5
    groups = {name: EXAONE4_5.group_of(name) for name, _ in model.named_parameters()}
    assert set(groups.values()) == set(GROUPS)
    assert {n for n, g in groups.items() if g == "connector"} == {n for n in groups if ".merger." in n}
    assert groups["model.visual.blocks.0.attn.qkv.weight"] == "vision"
    assert len(model.get_submodule(EXAONE4_5.vision_layers)) == model.config.vision_config.depth

    # A broad target list (the ViT's own qkv/proj and SwiGLU names included) still reaches only the LLM.
    config = TrainConfig(stage="finetune")
    config.lora.targets = [*config.lora.targets, "qkv", "proj"]
    lora_model, _ = prepare_model(model, EXAONE4_5, config)
    lora_modules = [name for name, module in lora_model.named_modules() if hasattr(module, "lora_A")]
    assert lora_modules and all(".language_model." in name for name in lora_modules)
    assert not any(".visual." in name and "lora_" in name for name, _ in lora_model.named_parameters())


def test_one_align_step_moves_only_the_whole_merger(grafts):
    from vlmgraft.train.config import TrainConfig
    from vlmgraft.train.stages import prepare_model

    model = AutoModelForImageTextToText.from_pretrained(grafts["qwen3"])
    processor = AutoProcessor.from_pretrained(grafts["qwen3"])
    model, plan = prepare_model(model, EXAONE4_5, TrainConfig(stage="align"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = _image_batch(processor, [Image.new("RGB", (48, 48), "green")])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert plan.groups == {"connector"}
    assert changed == {n for n, _ in model.named_parameters() if ".merger." in n}


def test_stock_generate_runs_with_one_d_positions(grafts):
    model = AutoModelForImageTextToText.from_pretrained(grafts["qwen3"]).eval()
    processor = AutoProcessor.from_pretrained(grafts["qwen3"])
    batch = _image_batch(processor, [Image.new("RGB", (48, 48), "green")])
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4 or processor.tokenizer.eos_token_id in out[0]


def test_processor_tells_serving_engines_the_placeholder_count(grafts):
    """vLLM's Transformers backend asks the processor how many placeholders an image of a given size becomes."""
    processor = AutoProcessor.from_pretrained(grafts["qwen3"])
    sizes = [(56, 40), (200, 30)]
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    for (height, width), count in zip(sizes, counts, strict=True):
        batch = _image_batch(processor, [Image.new("RGB", (width, height))])
        assert count == int((batch["input_ids"] == processor.image_token_id).sum())


def test_the_trainers_label_only_loss_runs_through_transformers_exaone_forward(grafts):
    """Without the SmolVLM collator's plan, the trainer's loss takes transformers' own forward (image_grid_thw too)."""
    from vlmgraft.train.trainer import label_only_loss

    model = AutoModelForImageTextToText.from_pretrained(grafts["qwen3"])
    processor = AutoProcessor.from_pretrained(grafts["qwen3"])
    batch = dict(_image_batch(processor, [Image.new("RGB", (48, 32), "green"), Image.new("RGB", (32, 64), "red")]))
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    loss, count = label_only_loss(model, batch)
    loss.backward()
    connector = model.get_submodule(EXAONE4_5.connector)
    assert torch.isfinite(loss) and count > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())


def test_donor_without_a_video_preprocessor_config_still_saves_a_matching_video_processor(donor, tiny_dir, tmp_path):
    """Older Qwen2.5-VL folders ship only preprocessor_config.json; the export needs a video processor to load."""
    older = tmp_path / "older"
    shutil.copytree(donor, older)
    (older / "video_preprocessor_config.json").unlink()
    out = tmp_path / "graft"
    assert build(BuildOptions(vision=str(older), llm=str(tiny_dir / "qwen3"), out=out), **QUIET).passed
    video = AutoProcessor.from_pretrained(out).video_processor
    published = json.loads((older / "preprocessor_config.json").read_text())
    assert (video.patch_size, video.merge_size) == (published["patch_size"], published["merge_size"])
    assert (video.size["shortest_edge"], video.size["longest_edge"]) == (TINY_MIN_PIXELS, TINY_MAX_PIXELS)


def test_a_video_goes_through_the_stock_processor_and_model(grafts):
    """video_token_id is the LLM's <|video_pad|>: the processor writes one per merged video patch, the model fills it."""
    model = AutoModelForImageTextToText.from_pretrained(grafts["qwen3"]).eval()
    processor = AutoProcessor.from_pretrained(grafts["qwen3"])
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    frames = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    batch = processor(text=[text], videos=[frames], return_tensors="pt")
    with torch.no_grad():
        features = model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output
        logits = model(**{k: v for k, v in batch.items() if k != "video_metadata"}).logits
    assert int((batch["input_ids"] == model.config.video_token_id).sum()) == sum(f.shape[0] for f in features) > 0
    assert torch.isfinite(logits).all()
