"""SigLIP and CLIP donors → stock LlavaForConditionalGeneration: build, audit, stock reload, exact LLM, module groups."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from vlmgraft.errors import VlmgraftError
from vlmgraft.fixtures.encoders import save_tiny_clip, save_tiny_siglip
from vlmgraft.graft.build import BuildOptions, audit_folder, build
from vlmgraft.graft.families import GROUPS, LLAVA, family_for

QUIET = {"log": lambda *_: None}
DONORS = {"siglip": (save_tiny_siglip, False), "clip": (save_tiny_clip, False),
          "siglip-vision": (save_tiny_siglip, True), "clip-vision": (save_tiny_clip, True)}
EXPECTED = {"siglip": ("SiglipVisionModel", "full", -1), "clip": ("CLIPVisionModel", "default", -2)}


@pytest.fixture(scope="module")
def donors(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {name: make(root / name, vision_only=vision_only) for name, (make, vision_only) in DONORS.items()}


@pytest.fixture(scope="module")
def grafts(donors, tiny_dir, tmp_path_factory):
    """Each donor onto the tied tiny Qwen3, saved in float32 so that reloaded tensors compare exactly."""
    root = tmp_path_factory.mktemp("llava-grafts")
    out = {}
    for name, donor in donors.items():
        out[name] = root / name
        build(BuildOptions(vision=str(donor), llm=str(tiny_dir / "qwen3"), out=out[name], dtype="float32"), **QUIET)
    return out


def _image_batch(processor, images, question="What colour is it?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("name", list(DONORS))
def test_build_reloads_as_stock_llava_with_the_llm_exact(name, donors, grafts, tiny_dir):
    out = grafts[name]
    kind = name.split("-")[0]
    vision_class, strategy, layer = EXPECTED[kind]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and "auto_map" not in config
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen3")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(model.model.language_model) is type(base.model)
    assert type(model.model.vision_tower).__name__ == vision_class
    assert (model.config.vision_feature_select_strategy, model.config.vision_feature_layer) == (strategy, layer)
    vision = model.config.vision_config
    assert model.config.image_seq_length == (vision.image_size // vision.patch_size) ** 2
    image_pad = AutoTokenizer.from_pretrained(tiny_dir / "qwen3").convert_tokens_to_ids("<|image_pad|>")
    assert model.config.image_token_id == processor.image_token_id == image_pad

    # Every LLM tensor, q/k-norm included, is the LLM's own.
    graft_state = model.state_dict()
    for key, value in base.state_dict().items():
        target = "model.language_model." + key[len("model."):] if key.startswith("model.") else key
        assert torch.equal(graft_state[target], value), key
    assert any(".q_norm." in k for k in base.state_dict()) and any(".k_norm." in k for k in base.state_dict())
    # Every kept vision tensor is the donor's own.
    donor = AutoModel.from_pretrained(donors[name])
    tower = getattr(donor, "vision_model", donor)
    for key, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, tower.state_dict()[key]), key

    model.eval()
    with torch.no_grad():
        ids = processor.tokenizer.apply_chat_template([{"role": "user", "content": "天空是什么颜色？"}],
                                                      add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        batch = _image_batch(processor, [Image.new("RGB", (40, 56), "red"), Image.new("RGB", (40, 56), "blue")])
        logits = model(**batch).logits[:, -1]
    assert (logits[0] - logits[1]).abs().max() > 1e-6
    assert int((batch["input_ids"][0] == image_pad).sum()) == model.config.image_seq_length


def test_report_accounts_for_every_donor_tensor_with_reasons(donors, grafts):
    for name in ("siglip", "clip"):
        report = json.loads((grafts[name] / "graft_report.json").read_text())
        assert report["audit"]["passed"] and report["architecture"] == "LlavaForConditionalGeneration"
        assert report["added_token_ids"] == [] and report["tokens"]["image_token"] == "<|image_pad|>"
        ledger = report["ledger"]
        donor_keys = set(load_file(donors[name] / "model.safetensors"))
        accounted = {v.split(":", 1)[1] for v in ledger["copied"].values() if v.startswith("donor:")}
        accounted |= {k.split(":", 1)[1] for k in ledger["dropped"] if k.startswith("donor:")}
        assert accounted == donor_keys
        dropped = ledger["dropped"]
        assert any(k.startswith("donor:text_model.") and "text tower" in r for k, r in dropped.items())
        assert any(k.startswith("donor:logit_scale") for k in dropped)
        if name == "siglip":
            assert any(k.startswith("donor:vision_model.head.") and "pooling head" in r for k, r in dropped.items())
        else:
            assert {"donor:visual_projection.weight", "donor:text_projection.weight"} <= set(dropped)
        assert sorted(ledger["reinitialised"]) == sorted(f"model.multi_modal_projector.linear_{i}.{p}"
                                                         for i in (1, 2) for p in ("weight", "bias"))


def test_image_tokens_enter_at_the_llms_embedding_scale(grafts):
    """The projector init follows the SmolVLM connector's principle: image features at the text embeddings' RMS."""
    for name in ("siglip", "clip"):
        model = AutoModelForImageTextToText.from_pretrained(grafts[name])
        processor = AutoProcessor.from_pretrained(grafts[name])
        pixels = processor.image_processor(images=[Image.effect_noise((32, 32), 60).convert("RGB")],
                                           return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = model.get_image_features(pixel_values=pixels).pooler_output[0]
        ratio = features.pow(2).mean().sqrt() / model.get_input_embeddings().weight.pow(2).mean().sqrt()
        assert 0.3 < ratio < 3, f"{name}: image features at {ratio:.2f}× the embedding RMS"


def test_saved_folder_passes_vlmgraft_audit(donors, grafts, tiny_dir):
    report = audit_folder(str(grafts["clip"]), str(donors["clip"]), str(tiny_dir / "qwen3"), **QUIET)
    assert report.passed
    assert any(c.name == "copied tensors equal sources" and c.passed for c in report.checks)


@pytest.mark.parametrize("llm", ["llama3", "qwen3-untied"])
def test_llm_without_image_pad_gets_a_new_reported_token_and_heads_stay_untied(llm, donors, tiny_dir, tmp_path):
    out = tmp_path / "graft"
    assert build(BuildOptions(vision=str(donors["siglip"]), llm=str(tiny_dir / llm), out=out), **QUIET).passed
    report = json.loads((out / "graft_report.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(tiny_dir / llm)
    if llm == "llama3":
        assert report["tokens"]["image_token"] == "<image>" and len(report["added_token_ids"]) == 1
        assert processor.image_token_id == model.config.image_token_id == report["added_token_ids"][0]
        assert processor.image_token_id not in original.get_vocab().values()
    else:
        assert report["added_token_ids"] == []
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_preprocessor_size_that_disagrees_with_the_tower_is_refused(tiny_dir, tmp_path):
    donor = save_tiny_siglip(tmp_path / "siglip")
    settings = json.loads((donor / "preprocessor_config.json").read_text())
    settings["size"] = {"height": 48, "width": 48}
    (donor / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(VlmgraftError, match="preprocessor_config.json.*image_size 32"):
        build(BuildOptions(vision=str(donor), llm=str(tiny_dir / "qwen3"), out=tmp_path / "out"), **QUIET)
    assert not (tmp_path / "out").exists()


def test_module_groups_cover_the_llava_export_and_lora_stays_off_the_vision_tower(grafts):
    from vlmgraft.train.config import TrainConfig
    from vlmgraft.train.stages import prepare_model

    model = AutoModelForImageTextToText.from_pretrained(grafts["siglip"])
    assert family_for(model.config.model_type) is LLAVA
    groups = {LLAVA.group_of(name) for name, _ in model.named_parameters()}
    assert groups == set(GROUPS) - {"lm_head"}  # tied: the head is the embedding matrix
    assert len(model.get_submodule(LLAVA.vision_layers)) == model.config.vision_config.num_hidden_layers

    lora_model, _ = prepare_model(model, LLAVA, TrainConfig(stage="finetune"))
    lora_modules = [name for name, module in lora_model.named_modules() if hasattr(module, "lora_A")]
    assert lora_modules and all(".language_model." in name for name in lora_modules)
    assert not any("vision_tower" in name and "lora_" in name for name, _ in lora_model.named_parameters())


def test_one_align_step_through_transformers_forward_moves_only_the_connector(grafts):
    from vlmgraft.train.config import TrainConfig
    from vlmgraft.train.stages import prepare_model

    model = AutoModelForImageTextToText.from_pretrained(grafts["clip"])
    processor = AutoProcessor.from_pretrained(grafts["clip"])
    model, plan = prepare_model(model, LLAVA, TrainConfig(stage="align"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = _image_batch(processor, [Image.new("RGB", (32, 32), "green")])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    changed = {LLAVA.group_of(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert plan.groups == {"connector"} and changed == {"connector"}


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_trained_vision_layers_are_those_the_projector_reads(name, grafts):
    """LLaVA reads SigLIP's last layer without its post-norm and CLIP's penultimate one: 'the last N vision layers'
    must be layers that get a gradient, not the unused tail."""
    from vlmgraft.train.config import TrainConfig
    from vlmgraft.train.stages import prepare_model

    model = AutoModelForImageTextToText.from_pretrained(grafts[name])
    processor = AutoProcessor.from_pretrained(grafts[name])
    model, _ = prepare_model(model, LLAVA, TrainConfig(stage="align", vision_trainable_layers=2))
    trained = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(LLAVA.vision + ".")]
    batch = _image_batch(processor, [Image.new("RGB", (32, 32), "green")])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    model(**batch, labels=labels).loss.backward()
    params = dict(model.named_parameters())
    assert trained and all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in trained)
    layers = {LLAVA.vision_layer_index(n) for n in trained}
    assert len(layers) == 2 and not any("post_layernorm" in n for n in trained)


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_processor_tells_serving_engines_the_placeholder_count(name, grafts):
    """vLLM's Transformers backend asks the processor how many placeholders an image of a given size becomes."""
    processor = AutoProcessor.from_pretrained(grafts[name])
    model_config = json.loads((grafts[name] / "config.json").read_text())
    counts = processor._get_num_multimodal_tokens(image_sizes=[(100, 80), (20, 300)])
    assert counts.num_image_tokens == [model_config["image_seq_length"]] * 2
    pixels = processor.image_processor(images=[Image.new("RGB", (70, 40))], return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (model_config["vision_config"]["image_size"],) * 2


def test_offline_hub_id_of_a_siglip_donor_gives_one_clear_sentence(tiny_dir, tmp_path):
    with pytest.raises(VlmgraftError) as err:
        build(BuildOptions(vision="google/siglip-so400m-patch14-384", llm=str(tiny_dir / "qwen3"),
                           out=tmp_path / "x"), **QUIET)
    assert "'google/siglip-so400m-patch14-384'" in str(err.value) and "local folder" in str(err.value)


def test_the_trainers_label_only_loss_runs_through_transformers_llava_forward(grafts):
    """Without the SmolVLM collator's plan, training takes transformers' own forward (train/image_inputs.py)."""
    from vlmgraft.train.trainer import label_only_loss

    model = AutoModelForImageTextToText.from_pretrained(grafts["siglip"])
    processor = AutoProcessor.from_pretrained(grafts["siglip"])
    batch = dict(_image_batch(processor, [Image.new("RGB", (32, 32), "green"), Image.new("RGB", (32, 32), "red")]))
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    loss, count = label_only_loss(model, batch)
    loss.backward()
    connector = model.get_submodule(LLAVA.connector)
    assert torch.isfinite(loss) and count > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())
