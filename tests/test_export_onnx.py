"""`vlmgraft export onnx`: onnxruntime reproduces PyTorch's image features, logits and cached decoding."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmgraft.export.onnx_export import export_onnx
from vlmgraft.export.onnx_runtime import OnnxVlm
from vlmgraft.export.parity import render, synthetic_images


@pytest.fixture(scope="module")
def exported(tiny_graft, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(str(tiny_graft), out, force=True, log=lambda *_: None)
    return out


def _rel(reference: torch.Tensor, got: np.ndarray) -> float:
    return float(np.abs(reference.numpy() - got).max() / reference.abs().max())


def test_manifest_describes_valid_graphs(exported):
    manifest = json.loads((exported / "onnx_manifest.json").read_text())
    assert manifest["verification"]["passed"]
    for graph, filename in manifest["files"].items():
        model = onnx.load(str(exported / filename))
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == [i["name"] for i in manifest["graphs"][graph]["inputs"]]
        assert [o.name for o in model.graph.output] == [o["name"] for o in manifest["graphs"][graph]["outputs"]]
    assert len(manifest["graphs"]["decoder"]["inputs"]) == 3 + 2 * manifest["num_hidden_layers"]


@torch.no_grad()
def test_left_padded_batch_of_different_images_matches_pytorch(tiny_graft, exported):
    """Two images with different tile counts: the runtime must drop padding tiles and honour left padding."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_graft)
    questions = ["What is this?", "图里有什么颜色？请详细说明。"]
    texts = [render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}])
             for q in questions]
    images = synthetic_images()
    batch = processor(text=texts, images=[[images[0]], [images[1].resize((64, 20))]], padding=True,
                      padding_side="left", return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded, in tokens and in tiles
    assert (batch["pixel_values"][1] == 0).flatten(1).all(1).any()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    reference = model(**batch, position_ids=positions).logits

    runner = OnnxVlm(exported)
    logits, present = runner.prefill(*(batch[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values",
                                                                  "pixel_attention_mask")))
    real = batch["attention_mask"].bool()
    assert _rel(reference[real], logits[real.numpy()]) < 1e-4

    tokens = runner.generate(*(batch[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values",
                                                          "pixel_attention_mask")), max_new_tokens=4)
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None,
                               pad_token_id=processor.tokenizer.pad_token_id)
    np.testing.assert_array_equal(tokens, generated[:, batch["input_ids"].shape[1]:].numpy())
    assert present[0].shape[2] == batch["input_ids"].shape[1]


def test_export_refuses_to_overwrite(tiny_graft, exported):
    from vlmgraft.errors import VlmgraftError

    with pytest.raises(VlmgraftError, match="--force"):
        export_onnx(str(tiny_graft), exported)
    with pytest.raises(VlmgraftError, match="overwrite the model"):
        export_onnx(str(tiny_graft), tiny_graft.parent, force=True)
    assert (exported / "decoder.onnx").exists() and (tiny_graft / "config.json").exists()
