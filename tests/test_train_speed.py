"""Speed switches change no result: the dropped right-padding mask, the attention choice, regional compilation."""

from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import SMOLVLM
from vlmgraft.model.common import unwrap_model
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.speed import (
    FLEX,
    attention_for,
    compile_regions,
    fuse_mlp_gelu,
    patchify_with_matmul,
    settings_for_generation,
)
from vlmgraft.train.stages import prepare_model
from vlmgraft.train.trainer import drop_right_padding_mask, label_only_loss


def _padded_batch(processor, side: str):
    """Two samples of different lengths (so one row is padded), labels on the answers only."""
    texts, images = [], []
    for answer in ("red", "a dark red square on a light grey background, slightly to the left"):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
                    {"role": "assistant", "content": answer}]
        texts.append(processor.apply_chat_template(messages))
        images.append([Image.new("RGB", (64, 48), (180, 20, 20))])
    processor.tokenizer.padding_side = side
    batch = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, :-12] = -100
    batch["labels"] = labels
    return batch


def _align_model(path, stage: str = "align"):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)  # LoRA's random A matrices: the same in every copy
    config = TrainConfig(model="m", data="d", stage=stage)
    config.lora.dropout = 0.0  # no random masks: two copies must compute the same gradients
    model, _ = prepare_model(model, SMOLVLM, config)
    return model


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss, count = label_only_loss(model, batch, **kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), count, grads


def test_right_padding_mask_is_dropped_without_changing_loss_or_gradients(tiny_graft):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    batch = _padded_batch(processor, "right")
    assert (batch["attention_mask"] == 0).any()  # one row really is padded
    assert "attention_mask" not in drop_right_padding_mask(batch)
    left = _padded_batch(processor, "left")
    assert "attention_mask" in drop_right_padding_mask(left)  # left padding would be visible: the mask stays
    model = _align_model(tiny_graft)
    masked = _loss_and_grads(model, batch, padding_mask=True)
    causal_only = _loss_and_grads(model, batch)
    assert masked[1] == causal_only[1] > 0
    torch.testing.assert_close(causal_only[0], masked[0], rtol=1e-5, atol=1e-6)
    for name, grad in masked[2].items():
        torch.testing.assert_close(causal_only[2][name], grad, rtol=1e-4, atol=1e-6)
    assert "attention_mask" in batch  # the caller's batch is left as it was


def test_attention_choice():
    assert attention_for("auto", packing=True, cuda=False) == "sdpa"  # flex attention has no CPU backward
    assert attention_for("auto", packing=False, cuda=True) == "sdpa"
    packed_on_gpu = attention_for("auto", packing=True, cuda=True)
    assert packed_on_gpu["text_config"] == FLEX and packed_on_gpu["vision_config"] == "sdpa"
    assert attention_for("eager", packing=True, cuda=False) == "eager"
    with pytest.raises(VlmgraftError, match="only on CUDA"):
        attention_for(FLEX, packing=True, cuda=False)


def test_cuda_graphs_are_off_unless_asked_and_refused_where_nothing_is_compiled(monkeypatch):
    from vlmgraft.train.speed import cuda_graphs_enabled

    assert TrainConfig().cuda_graphs is False  # every new batch shape records new graphs: opt-in only
    with pytest.raises(VlmgraftError, match="cuda_graphs"):
        cuda_graphs_enabled(True, compiled=True)  # this CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_graphs_enabled(True, compiled=True)
    assert not cuda_graphs_enabled(False, compiled=True)
    with pytest.raises(VlmgraftError, match="compile"):
        cuda_graphs_enabled(True, compiled=False)


def test_generation_switches_flex_attention_to_sdpa_and_back(tiny_graft):
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32)
    model.config.text_config._attn_implementation = FLEX
    with settings_for_generation(model):
        assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == FLEX
    assert model.config.vision_config._attn_implementation != FLEX  # untouched


def test_packed_run_attends_with_sdpa_when_no_row_holds_two_samples(tiny_graft, tmp_path):
    """A packed run's LLM attends with flex attention (on CUDA), but image-heavy samples fill a row each: such a
    batch comes as padded rows, and the whole training step (backward included) runs SDPA's causal kernel, with
    the loss of an SDPA model; a batch whose rows hold several samples keeps flex attention."""
    from transformers import TrainingArguments

    from vlmgraft.data.collate import VisionChatCollator
    from vlmgraft.data.shapes import ShapesWorld
    from vlmgraft.train.speed import sdpa_for_unpacked_rows
    from vlmgraft.train.trainer import GraftTrainer

    processor = AutoProcessor.from_pretrained(tiny_graft)
    samples = ShapesWorld(image_size=64, seed=4).vqa_samples(3, "en", "count")
    lengths = [len(VisionChatCollator(processor).encode(s)) for s in samples]
    assert 2 * min(lengths) > max(lengths)  # so that a row of max(lengths) holds one sample
    alone = VisionChatCollator(processor, max_length=max(lengths), packing=True)(samples)
    shared = VisionChatCollator(processor, max_length=4 * max(lengths), packing=True)(samples)
    assert "position_ids" not in alone and alone["attention_mask"].shape[0] == 3
    assert "position_ids" in shared and shared["input_ids"].shape[0] == 1

    model = _align_model(tiny_graft)
    reference = label_only_loss(model, alone)[0].detach()  # every layer on SDPA
    text_config = model.config.text_config
    text_config._attn_implementation = FLEX  # as loaded for a packed run on CUDA
    seen = []
    layer = model.get_submodule(SMOLVLM.llm_layers)[0]
    layer.register_forward_hook(lambda *_: seen.append(("forward", text_config._attn_implementation)))
    layer.register_full_backward_hook(lambda *_: seen.append(("backward", text_config._attn_implementation)))
    config = TrainConfig(model="m", data="d", stage="align")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = GraftTrainer(model=model, args=args, data_collator=VisionChatCollator(processor), family=SMOLVLM,
                           graft_config=config)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    loss = trainer.training_step(model, alone)
    assert seen == [("forward", "sdpa"), ("backward", "sdpa")]
    assert text_config._attn_implementation == FLEX  # restored after the step
    torch.testing.assert_close(loss, reference)
    with sdpa_for_unpacked_rows(model, shared):
        assert text_config._attn_implementation == FLEX


@pytest.mark.parametrize("stage", ["align", "finetune"])  # finetune: PEFT-wrapped LoRA layers and vision layers
def test_compiled_layers_train_the_same_and_keep_checkpoint_names(tiny_graft, stage):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    eager, compiled = _align_model(tiny_graft, stage), _align_model(tiny_graft, stage)
    names = set(compiled.state_dict())
    config = compiled.config
    # align trains nothing in the vision tower: one region for its encoder (transformers' image path) and one graph
    # for the whole tower (the collator's planned path), for fusion across its layers
    vision_regions = 2 if stage == "align" else config.vision_config.num_hidden_layers
    assert compile_regions(compiled, SMOLVLM) == config.text_config.num_hidden_layers + vision_regions + 1  # connector
    assert set(compiled.state_dict()) == names  # no _orig_mod. prefix: checkpoints and merges are unchanged
    from vlmgraft.data.collate import VisionChatCollator
    from vlmgraft.data.shapes import ShapesWorld
    from vlmgraft.train.image_inputs import _COMPILED_TOWERS

    assert (unwrap_model(compiled).get_submodule(SMOLVLM.vision) in _COMPILED_TOWERS) == (stage == "align")

    collator = VisionChatCollator(processor, max_length=512)
    planned = collator.to_device(collator(ShapesWorld(image_size=64, seed=4).vqa_samples(2, "en", "colour")), "cpu")
    for batch in (_padded_batch(processor, "right"), _padded_batch(processor, "left"), planned):
        # two shapes through transformers' path (a recompile, then the same results), then the collator's plan
        reference, result = _loss_and_grads(eager, batch), _loss_and_grads(compiled, batch)
        torch.testing.assert_close(result[0], reference[0], rtol=1e-4, atol=1e-5)
        for name, grad in reference[2].items():
            torch.testing.assert_close(result[2][name], grad, rtol=1e-3, atol=1e-5)
    # Sample answers mid-training run the layers eagerly: generation compiles nothing new.
    from torch._dynamo.utils import counters

    from vlmgraft.train.callbacks import answer_samples

    graphs = counters["stats"]["unique_graphs"]
    answers = answer_samples(compiled, processor, ShapesWorld(image_size=64, seed=2).vqa_samples(2, "en", "colour"),
                             max_new_tokens=3)
    assert len(answers) == 2 and counters["stats"]["unique_graphs"] == graphs


def test_patch_embedding_as_matmul_equals_the_convolution(tiny_graft):
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32)
    conv = model.get_submodule(SMOLVLM.vision_patch_embedding)
    pixels = torch.randn(3, 3, conv.kernel_size[0] * 4 + 3, conv.kernel_size[0] * 5)  # a ragged edge is cropped
    with torch.no_grad():
        reference = conv(pixels)
        assert patchify_with_matmul(model, SMOLVLM)
        torch.testing.assert_close(conv(pixels), reference, rtol=1e-5, atol=1e-5)
    assert set(dict(conv.named_parameters())) == {"weight", "bias"}  # same weights, same checkpoint


def test_vision_mlp_with_gelu_in_the_matmul_matches_and_leaves_trained_layers_to_autograd(tiny_graft):
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32)
    layers = model.get_submodule(SMOLVLM.vision_layers)
    layers[0].mlp.activation_fn = torch.nn.ReLU()  # not tanh-GELU: must be left alone
    hidden = torch.randn(2, 5, layers[1].mlp.fc1.in_features)
    with torch.no_grad():
        reference = [layer.mlp(hidden) for layer in layers]
    assert fuse_mlp_gelu(model, SMOLVLM) == len(layers) - 1
    with torch.no_grad():
        # On the CPU `_addmm_activation` applies the exact GELU (CUDA: tanh, the MLP's own): equal up to 1e-3.
        for layer, expected in zip(layers, reference, strict=True):
            torch.testing.assert_close(layer.mlp(hidden), expected, rtol=1e-3, atol=1e-3)
    trained = layers[-1].mlp
    out = trained(hidden.requires_grad_())  # gradients wanted: the layer's own autograd path, bit for bit
    torch.testing.assert_close(out, reference[-1], rtol=0, atol=0)
    out.sum().backward()
    assert trained.fc1.weight.grad is not None and hidden.grad is not None
    assert set(dict(trained.named_parameters())) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


@pytest.mark.parametrize("pixels", ["processor", "uint8"])
def test_image_features_placed_from_the_plan_match_transformers_path(tiny_graft, monkeypatch, pixels):
    """Rows with different tile counts (so padding tiles) and a text-only row: the plan's index path gives
    transformers' loss and gradients, and never calls transformers' image path (which reads from the GPU)."""
    from vlmgraft.data.collate import VisionChatCollator
    from vlmgraft.data.sample import Sample
    from vlmgraft.data.shapes import ShapesWorld
    from vlmgraft.train.image_inputs import images_into_embeddings

    processor = AutoProcessor.from_pretrained(tiny_graft)
    samples = (ShapesWorld(image_size=64, seed=4).vqa_samples(2, "en", "colour")
               + ShapesWorld(image_size=(200, 90), seed=5).vqa_samples(1, "en", "colour")
               + [Sample(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])])
    collator = VisionChatCollator(processor, max_length=1024, pixels=pixels)
    batch = collator.to_device(collator(samples), "cpu")
    plan = batch["loss_plan"]
    assert plan.tile_index.numel() < batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1]  # padding tiles
    model = _align_model(tiny_graft)
    assert images_into_embeddings(model, batch["input_ids"], batch["pixel_values"], plan) is not None
    reference = _loss_and_grads(model, {k: v for k, v in batch.items() if k != "loss_plan"})
    monkeypatch.setattr(type(model.model), "get_image_features", lambda *a, **k: pytest.fail("transformers' path"))
    planned = _loss_and_grads(model, batch)
    torch.testing.assert_close(planned[0], reference[0])
    assert planned[2].keys() == reference[2].keys() and planned[2]
    for name, grad in reference[2].items():
        torch.testing.assert_close(planned[2][name], grad)


@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_a_frozen_bf16_vision_tower_runs_outside_autocast_as_at_inference(tiny_graft, stage, monkeypatch):
    """CUDA's autocast turns every layer norm's output float32, so a frozen bf16 tower under it wrote its features
    as float32. `align` runs the tower as inference does (autocast off) and the trained connector under autocast;
    `finetune` trains float32 vision layers, which need autocast. The features are those of the autocast path."""
    from vlmgraft.data.collate import VisionChatCollator
    from vlmgraft.data.shapes import ShapesWorld
    from vlmgraft.train import image_inputs

    processor = AutoProcessor.from_pretrained(tiny_graft)
    collator = VisionChatCollator(processor, max_length=512)
    batch = collator.to_device(collator(ShapesWorld(image_size=64, seed=4).vqa_samples(2, "en", "colour")), "cpu",
                               torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.bfloat16, attn_implementation="sdpa")
    model, _ = prepare_model(model, SMOLVLM, TrainConfig(model="m", data="d", stage=stage))
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = torch.is_autocast_enabled("cpu")
        return hook

    for name in ("model.vision_model.encoder", "model.vision_model.post_layernorm", "model.connector"):
        unwrap_model(model).get_submodule(name).register_forward_pre_hook(record(name))

    def embeddings():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return image_inputs.images_into_embeddings(model, batch["input_ids"], batch["pixel_values"],
                                                       batch["loss_plan"])

    embeds = embeddings()
    in_autocast = stage == "finetune"
    assert seen == {"model.vision_model.encoder": in_autocast, "model.vision_model.post_layernorm": in_autocast,
                    "model.connector": True}
    monkeypatch.setattr(image_inputs, "frozen_vision_outside_autocast", lambda *a: contextlib.nullcontext())
    torch.testing.assert_close(embeds, embeddings())


def test_trainer_runs_the_planned_image_path_under_the_models_autocast(tiny_graft, tmp_path):
    """bf16 frozen weights, an fp32 connector: the Trainer autocasts only inside model.forward, and the planned image
    path runs before it, so without the trainer's own autocast the connector's matmul meets bf16 inputs and fails."""
    from transformers import TrainingArguments

    from vlmgraft.data.collate import VisionChatCollator
    from vlmgraft.data.shapes import ShapesWorld
    from vlmgraft.train.trainer import GraftTrainer

    processor = AutoProcessor.from_pretrained(tiny_graft)
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.bfloat16, attn_implementation="sdpa")
    config = TrainConfig(model="m", data="d", stage="align")
    model, _ = prepare_model(model, SMOLVLM, config)
    assert model.get_submodule(SMOLVLM.connector).modality_projection.proj.weight.dtype == torch.float32
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to=[], disable_tqdm=False)
    collator = VisionChatCollator(processor, max_length=512)
    trainer = GraftTrainer(model=model, args=args, data_collator=collator, family=SMOLVLM, graft_config=config)
    from vlmgraft.train.callbacks import ProgressWithRates

    bars = [type(c).__name__ for c in trainer.callback_handler.callbacks if "Progress" in type(c).__name__]
    assert bars == [ProgressWithRates.__name__]  # the stock bar replaced, not doubled
    batch = trainer._prepare_inputs(collator(ShapesWorld(image_size=64, seed=4).vqa_samples(2, "en", "colour")))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.get_submodule(SMOLVLM.connector).modality_projection.proj.weight.grad is not None


@pytest.mark.parametrize("packing", [False, True])
def test_the_collators_loss_plan_gives_the_loss_computed_from_the_gpu_tensors(tiny_graft, packing, monkeypatch):
    """The step reads nothing back from the GPU when the collator's plan is there, and computes the same loss. Rows
    of one sample skip transformers' packed-row check (an `if` on a GPU value); packed rows need it."""
    import transformers.masking_utils as masking

    from vlmgraft.data.collate import VisionChatCollator
    from vlmgraft.data.shapes import ShapesWorld

    processor = AutoProcessor.from_pretrained(tiny_graft)
    samples = ShapesWorld(image_size=64, seed=4).vqa_samples(3, "en", "count")
    batch = VisionChatCollator(processor, max_length=512, packing=packing)(samples)
    without_plan = {k: v for k, v in batch.items() if k != "loss_plan"}
    model = _align_model(tiny_graft)
    computed = _loss_and_grads(model, without_plan)
    checks = []
    find_packed = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda ids: checks.append(1) or find_packed(ids))
    planned = _loss_and_grads(model, batch)
    assert bool(checks) == packing
    assert planned[1] == computed[1] == batch["loss_plan"].label_tokens > 0
    torch.testing.assert_close(planned[0], computed[0])
    for name, grad in computed[2].items():
        torch.testing.assert_close(planned[2][name], grad)


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_packed_rows_train_like_padded_rows(tiny_graft, loss_on):
    """Samples packed into one row (kept apart by the position resets) give the loss and gradients of one sample per
    padded row. With the loss on every token, a sample's first token must not become the target of the previous
    sample's last one."""
    from vlmgraft.data.collate import VisionChatCollator
    from vlmgraft.data.shapes import ShapesWorld

    processor = AutoProcessor.from_pretrained(tiny_graft)
    samples = ShapesWorld(image_size=64, seed=4).vqa_samples(3, "en", "count")
    padded = VisionChatCollator(processor, max_length=512, loss_on=loss_on)(samples)
    packed = VisionChatCollator(processor, max_length=512, loss_on=loss_on, packing=True)(samples)
    assert packed["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 3
    model = _align_model(tiny_graft)
    reference, together = _loss_and_grads(model, padded), _loss_and_grads(model, packed)
    assert together[1] == reference[1] == packed["loss_plan"].label_tokens > 0
    torch.testing.assert_close(together[0], reference[0])
    for name, grad in reference[2].items():
        torch.testing.assert_close(together[2][name], grad)


def test_causal_flag_alone_only_where_it_is_the_whole_mask(tiny_graft):
    from types import SimpleNamespace

    from vlmgraft.train.trainer import causal_only_masks

    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, attn_implementation="sdpa")
    assert causal_only_masks(model) == {"full_attention": None}
    model.config.text_config._attn_implementation = "eager"  # eager attention adds the mask itself: none = no mask
    assert causal_only_masks(model) is None
    sliding = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa",
                                                     layer_types=["sliding_attention", "full_attention"]))
    assert causal_only_masks(sliding) is None
