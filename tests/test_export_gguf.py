"""`vlmgraft export gguf` through llama.cpp's own converter: the files hold the graft's weights, vocabulary and
projector settings, read back with the `gguf` library (no llama.cpp runtime needed; see test_export_gguf_llama_cpp).

The converter source is $VLMGRAFT_LLAMA_CPP when set, else llama-cpp-python's pinned sdist fetched with pip once
into the user cache, as `--llama-cpp download` does.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from vlmgraft.errors import VlmgraftError
from vlmgraft.export import gguf_export, gguf_source
from vlmgraft.export.gguf_convert import known_pre_tokenizer


@pytest.fixture(scope="session")
def llama_cpp_tree():
    return gguf_source.converter_tree(os.environ.get(gguf_source.ENV) or "download")


@pytest.fixture(scope="module")
def exported(tiny_graft, llama_cpp_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tied"
    report = gguf_export.export_gguf(str(tiny_graft), out, llama_cpp=str(llama_cpp_tree), log=lambda *_: None)
    return out, report


def read_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, in PyTorch's dimension order."""
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            .reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}


def field(path, key):
    return gguf.GGUFReader(path).fields[key].contents()


def graft_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            weights.update({k: f.get_tensor(k).float() for k in f.keys()})  # noqa: SIM118
    return weights


def expected_text(folder, arch) -> dict[str, torch.Tensor]:
    """The graft's text weights under the GGUF names llama.cpp gives a plain causal LM of the same architecture."""
    config = json.loads((folder / "config.json").read_text())
    names = gguf.get_tensor_name_map(arch, config["text_config"]["num_hidden_layers"])
    found = {}
    for key, value in graft_weights(folder).items():
        if key.startswith("model.text_model.") or key == "lm_head.weight":
            plain = key.replace("model.text_model.", "model.")
            found[names.get_name(plain, try_suffixes=(".weight", ".bias"))] = value
    return found


@pytest.mark.slow
def test_text_gguf_holds_the_graft_text_model_weights_in_f16(exported, tiny_graft):
    out, report = exported
    got = read_tensors(out / gguf_export.TEXT_FILE)
    want = expected_text(tiny_graft, gguf.MODEL_ARCH.QWEN3)
    assert set(got) == set(want)
    assert "output.weight" not in got  # tied: llama.cpp reuses token_embd
    for name, value in want.items():
        torch.testing.assert_close(torch.from_numpy(got[name]), value.half().float(), msg=name)
    assert report["text"]["architecture"] == "qwen3" and report["problems"] == []
    assert report["mtmd_differences"] == []


@pytest.mark.slow
def test_text_gguf_vocabulary_names_reused_vision_ids_as_mtmd_expects(exported, tiny_graft):
    from transformers import AutoTokenizer

    out, report = exported
    tokenizer = AutoTokenizer.from_pretrained(tiny_graft)
    tokens = gguf_export.gguf_tokens(out / gguf_export.TEXT_FILE)
    config = json.loads((tiny_graft / "config.json").read_text())
    assert len(tokens) == config["text_config"]["vocab_size"]  # no row added, none dropped
    fake, glob = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_pad|>"])
    assert tokens[fake] == "<fake_token_around_image>" and tokens[glob] == "<global-img>"
    assert tokens.count("<fake_token_around_image>") == 1 and tokens.count("<global-img>") == 1
    for token_id in range(len(tokenizer)):
        if token_id not in (fake, glob):
            assert tokens[token_id] == tokenizer.convert_ids_to_tokens(token_id), token_id
    assert tokens[tokenizer.convert_tokens_to_ids("<|image_pad|>")] == "<|image_pad|>"
    assert set(report["renamed_tokens"]) == {str(fake), str(glob)}
    # mtmd frames tiles with these newline runs, looked up as single tokens.
    assert "Ċ" in tokens and "ĊĊ" in tokens
    assert field(out / gguf_export.TEXT_FILE, "tokenizer.ggml.pre") == "qwen2"


@pytest.mark.slow
def test_mmproj_gguf_holds_vision_tower_and_connector_with_smolvlm_settings(exported, tiny_graft):
    out, report = exported
    path = out / gguf_export.MMPROJ_FILE
    config = json.loads((tiny_graft / "config.json").read_text())
    processor = json.loads((tiny_graft / "processor_config.json").read_text())["image_processor"]
    vision = config["vision_config"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision["num_hidden_layers"])
    want = {names.get_name(k, try_suffixes=(".weight", ".bias")): v for k, v in graft_weights(tiny_graft).items()
            if k.startswith(("model.vision_model.", "model.connector."))}
    got = read_tensors(path)
    # patch and position embeddings, 16 per encoder layer, post layer norm (2), connector projection.
    assert len(got) == 2 + 1 + 16 * vision["num_hidden_layers"] + 2 + 1 == len(want)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].shape == tuple(value.shape), name
        torch.testing.assert_close(torch.from_numpy(got[name]), value.half().float(), msg=name)
    assert field(path, "general.architecture") == "clip"
    assert field(path, "clip.projector_type") == "idefics3"
    assert field(path, "clip.vision.projector.scale_factor") == config["scale_factor"]
    assert field(path, "clip.vision.image_size") == vision["image_size"]
    assert field(path, "clip.vision.patch_size") == vision["patch_size"]
    assert field(path, "clip.vision.preproc_image_size") == processor["size"]["longest_edge"]
    assert field(path, "clip.vision.projection_dim") == config["text_config"]["hidden_size"]
    assert report["mmproj"]["tensors"] == len(want)


@pytest.mark.slow
def test_untied_graft_exports_lm_head_and_q8_0(tiny_dir, llama_cpp_tree, tmp_path):
    from vlmgraft.graft.build import BuildOptions, build

    graft = tmp_path / "graft-untied"
    build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "qwen3-untied"), out=graft),
          log=lambda *_: None)
    out = tmp_path / "gguf"
    gguf_export.export_gguf(str(graft), out, outtype="q8_0", llama_cpp=str(llama_cpp_tree), log=lambda *_: None)
    reader = gguf.GGUFReader(out / gguf_export.TEXT_FILE)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    got = read_tensors(out / gguf_export.TEXT_FILE)
    want = expected_text(graft, gguf.MODEL_ARCH.QWEN3)
    assert set(got) == set(want)
    for name, value in want.items():
        # Q8_0: blocks of 32 values share a step of max|block| / 127, so no value moves by more than the largest step.
        step = value.abs().max().item() / 127
        torch.testing.assert_close(torch.from_numpy(got[name]), value, atol=step, rtol=0, msg=name)
    # the vision part stays f16 whatever the text model's type
    assert {t.tensor_type for t in gguf.GGUFReader(out / gguf_export.MMPROJ_FILE).tensors} <= {
        gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}


@pytest.mark.slow
def test_export_refuses_to_overwrite_and_non_smolvlm_models(exported, tiny_dir, llama_cpp_tree, tiny_graft):
    out, _ = exported
    with pytest.raises(VlmgraftError, match="--force"):
        gguf_export.export_gguf(str(tiny_graft), out, llama_cpp=str(llama_cpp_tree), log=lambda *_: None)
    with pytest.raises(VlmgraftError, match="SmolVLM-family"):
        gguf_export.export_gguf(str(tiny_dir / "qwen3"), out.parent / "plain", llama_cpp=str(llama_cpp_tree),
                                log=lambda *_: None)


def test_missing_converter_source_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.delenv(gguf_source.ENV, raising=False)
    with pytest.raises(VlmgraftError, match="pip download --no-deps --no-binary :all: llama-cpp-python=="):
        gguf_source.converter_tree(None)
    with pytest.raises(VlmgraftError, match="missing: convert_hf_to_gguf.py"):
        gguf_source.converter_tree(tmp_path)


def test_graft_with_smolvlm_marker_tokens_needs_no_rename(tiny_dir, tmp_path):
    from transformers import AutoProcessor

    from vlmgraft.graft.build import BuildOptions, build

    graft = tmp_path / "graft-llama3"
    build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "llama3"), out=graft), log=lambda *_: None)
    assert gguf_export.mtmd_renames(AutoProcessor.from_pretrained(graft)) == {}


def test_rename_refuses_a_vocabulary_that_already_has_mtmd_names():
    vocab = {"<|vision_start|>": 5, "<|vision_pad|>": 6, "<fake_token_around_image>": 7}
    processor = SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: vocab),
                                fake_image_token="<|vision_start|>", global_image_token="<|vision_pad|>")
    with pytest.raises(VlmgraftError, match="id 7"):
        gguf_export.mtmd_renames(processor)


def test_pre_tokenizer_fallback_recognises_only_known_split_regexes(tiny_dir):
    qwen = json.loads((tiny_dir / "qwen3" / "tokenizer.json").read_text())
    llama = json.loads((tiny_dir / "llama3" / "tokenizer.json").read_text())
    assert known_pre_tokenizer(qwen) == "qwen2"
    assert known_pre_tokenizer(llama) == "llama-bpe"
    changed = json.loads(json.dumps(qwen))
    changed["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] += "|x"
    assert known_pre_tokenizer(changed) is None
    assert known_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}) is None


def test_processor_settings_mtmd_cannot_follow_are_reported(tiny_graft):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_graft)
    config = json.loads((tiny_graft / "config.json").read_text())
    assert gguf_export.mtmd_differences(processor, config) == []
    processor.image_processor.do_image_splitting = False
    processor.image_processor.max_image_size = {"longest_edge": 2 * config["vision_config"]["image_size"]}
    notes = gguf_export.mtmd_differences(processor, config)
    assert len(notes) == 2 and "tiles" in notes[0] and "px" in notes[1]


def test_cli_export_gguf_without_converter_source_explains(monkeypatch, tiny_graft, tmp_path, capsys):
    from vlmgraft.cli import main

    monkeypatch.delenv(gguf_source.ENV, raising=False)
    assert main(["export", "gguf", str(tiny_graft), "--out", str(tmp_path / "out")]) == 2
    assert "--llama-cpp" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_adapter_checkpoint_is_merged_before_conversion(tiny_graft, llama_cpp_tree, tmp_path):
    from test_export_merge import make_adapter_checkpoint

    from vlmgraft.export.checkpoints import load_model

    ckpt = make_adapter_checkpoint(tiny_graft, tmp_path / "ckpt", dora=False)
    out = tmp_path / "gguf"
    gguf_export.export_gguf(str(ckpt), out, llama_cpp=str(llama_cpp_tree), log=lambda *_: None)
    merged, _, _ = load_model(ckpt, dtype=torch.bfloat16)
    weights = {k: v.float() for k, v in merged.state_dict().items()}
    text, mmproj = read_tensors(out / gguf_export.TEXT_FILE), read_tensors(out / gguf_export.MMPROJ_FILE)
    q_proj = weights["model.text_model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q_proj, graft_weights(tiny_graft)["model.text_model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(torch.from_numpy(text["blk.0.attn_q.weight"]), q_proj.half().float())
    connector = weights["model.connector.modality_projection.proj.weight"]
    torch.testing.assert_close(torch.from_numpy(mmproj["mm.model.fc.weight"]), connector.half().float())
