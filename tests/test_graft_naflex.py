"""SigLIP2 NaFlex donors: converted to fixed-resolution SigLIP, the same features as Siglip2VisionModel, LLaVA export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from vlmgraft.errors import VlmgraftError
from vlmgraft.fixtures.encoders import save_tiny_siglip, save_tiny_siglip2_naflex
from vlmgraft.graft.build import BuildOptions, audit_folder, build

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def naflex(tmp_path_factory):
    root = tmp_path_factory.mktemp("naflex")
    return {"dual": save_tiny_siglip2_naflex(root / "dual"), "vision": save_tiny_siglip2_naflex(root / "vision",
                                                                                                vision_only=True)}


@pytest.mark.parametrize("kind", ["dual", "vision"])
@pytest.mark.parametrize("size", [None, 48])
def test_converted_tower_matches_siglip2_on_a_full_square_grid(kind, size, naflex, tiny_dir, tmp_path):
    out = tmp_path / "graft"
    build(BuildOptions(vision=str(naflex[kind]), llm=str(tiny_dir / "qwen3"), out=out, dtype="float32",
                       image_size=size), **QUIET)
    report = json.loads((out / "graft_report.json").read_text())
    side = size or 32  # the fixture's 4×4 position table of 8-px patches
    assert report["audit"]["passed"] and report["naflex_conversion"]["image_size"] == side
    assert report["image_seq_len"] == (side // 8) ** 2

    graft = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(graft.model.vision_tower).__name__ == "SiglipVisionModel"
    assert graft.config.vision_config.image_size == side
    original = AutoModel.from_pretrained(naflex[kind])
    tower = getattr(original, "vision_model", original)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    patches = AutoImageProcessor.from_pretrained(naflex[kind])(images=[image], max_num_patches=(side // 8) ** 2,
                                                               return_tensors="pt")
    assert patches["spatial_shapes"].tolist() == [[side // 8, side // 8]]
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = tower(**patches).last_hidden_state
        got = graft.model.vision_tower(pixel_values=pixels).last_hidden_state
    assert (got - expected).abs().max() <= 1e-4 * expected.pow(2).mean().sqrt()


def test_every_naflex_tensor_is_accounted_and_the_folder_re_audits(naflex, tiny_dir, tmp_path):
    out = tmp_path / "graft"
    build(BuildOptions(vision=str(naflex["dual"]), llm=str(tiny_dir / "qwen3"), out=out, image_size=48), **QUIET)
    ledger = json.loads((out / "graft_report.json").read_text())["ledger"]
    accounted = {v.split(":", 1)[1] for v in ledger["copied"].values() if v.startswith("donor:")}
    accounted |= {k.split(":", 1)[1] for k in ledger["dropped"] if k.startswith("donor:")}
    assert accounted == set(load_file(naflex["dual"] / "model.safetensors"))
    assert audit_folder(str(out), str(naflex["dual"]), str(tiny_dir / "qwen3"), **QUIET).passed


def test_image_size_is_refused_where_it_cannot_apply(naflex, tiny_dir, tmp_path):
    with pytest.raises(VlmgraftError, match="not a multiple of the donor's patch size 8"):
        build(BuildOptions(vision=str(naflex["dual"]), llm=str(tiny_dir / "qwen3"), out=tmp_path / "a",
                           image_size=44), **QUIET)
    siglip = save_tiny_siglip(tmp_path / "siglip")
    with pytest.raises(VlmgraftError, match="--image-size is for SigLIP2 NaFlex donors"):
        build(BuildOptions(vision=str(siglip), llm=str(tiny_dir / "qwen3"), out=tmp_path / "b", image_size=48),
              **QUIET)
