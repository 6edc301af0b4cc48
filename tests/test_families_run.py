"""LLaVA (SigLIP donor) and Exaone4.5 (Qwen2.5-VL donor) grafts through every stage: align training, merge, chat,
detect, eval, the engine against `model.generate()`, one served request, and ONNX export's refusal."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import scramble
from PIL import Image

from vlmgraft.cli import main
from vlmgraft.data.shapes import ShapesWorld
from vlmgraft.graft.families import family_for
from vlmgraft.infer.engine import Engine, EngineConfig
from vlmgraft.infer.generate import collate_left_padded, generate
from vlmgraft.infer.model import load_for_inference
from vlmgraft.infer.prompts import prepare
from vlmgraft.infer.sampling import SamplingParams
from vlmgraft.model import image_path_for

FAMILIES = ("llava", "exaone4_5")
RED = Image.new("RGB", (64, 48), (200, 30, 30))
BLUE = Image.new("RGB", (40, 64), (20, 30, 200))
CASES = [  # different lengths, 0/1/2 images
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hello"}]}], [RED]),
    ([{"role": "user", "content": [{"type": "text", "text": "what colour is the square in the picture"}]}], []),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "two"}]}],
     [RED, BLUE]),
]


@pytest.fixture(scope="module")
def grafts(family_grafts):
    return family_grafts


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    return str(ShapesWorld(image_size=64, seed=1).write(tmp_path_factory.mktemp("vqa"), "messages", 8, lang="en",
                                                        task="colour"))


def _weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return dict(AutoModelForImageTextToText.from_pretrained(folder).state_dict())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_align_train_merge_chat_and_eval(name, grafts, vqa_data, tmp_path, capsys):
    graft = grafts[name]
    run = tmp_path / "run"
    config = tmp_path / "align.yaml"
    config.write_text(f"model: {graft}\ndata: {vqa_data}\noutput_dir: {run}\nstage: align\n")
    assert main(["train", str(config), "--bf16", "false", "--report-to", "none", "--learning-rate", "5e-2",
                 "--max-steps", "2", "--save-steps", "2", "--logging-steps", "1", "--per-device-train-batch-size", "2",
                 "--eval-steps", "2", "--num-sample-images", "1", "--data-settings.num-workers", "0",
                 "--data-settings.eval-size", "2", "--data-settings.max-length", "256", "--seed", "3"]) == 0
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["vision_gaps"]  # the evaluation's vision probe ran on this family's pixels
    assert len((run / "samples.jsonl").read_text(encoding="utf-8").splitlines()) == 1
    family = family_for(name)
    before, after = _weights(graft), _weights(run / "final")
    groups = {k: family.group_of(k) for k in before}
    moved = {groups[k] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"connector"}  # the connector learnt; the vision tower and the LLM stayed frozen

    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged), "--dtype", "float32"]) == 0
    capsys.readouterr()
    picture = tmp_path / "red.png"
    RED.save(picture)
    assert main(["chat", str(merged), "--image", str(picture), "--prompt", "what colour is this", "--json",
                 "--max-new-tokens", "4", "--temperature", "0", "--no-think", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, processor = load_for_inference(merged, device="cpu", dtype="float32")
    image_tokens = image_path_for(model).token_count(model, prepare(processor, *CASES[0]).pixels)
    assert 1 <= result["tokens"] <= 4 and result["prompt_tokens"] > image_tokens > 0

    code = main(["detect", str(merged), "--image", str(picture), "--classes", "square,circle", "--lang", "en",
                 "--json", "--max-new-tokens", "6", "--device", "cpu", "--out", str(tmp_path / "boxes.png")])
    found = json.loads(capsys.readouterr().out)
    # Two align steps teach no boxes: the answer is reported raw, with exit code 1 when nothing parsed.
    assert found["classes"] == ["square", "circle"] and code == (0 if found["parsed"] else 1)
    assert (tmp_path / "boxes.png").exists()

    out = tmp_path / "eval"
    assert main(["eval", str(merged), "--data", vqa_data, "--tasks", "vqa", "--limit", "2", "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu"]) == 0
    assert json.loads((out / "results.json").read_text())["vqa"]["n"] == 2


def _hf_greedy(model, prompt, max_new_tokens):
    batch = collate_left_padded([prompt], 0, image_path_for(model))
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0,
                         top_k=50, eos_token_id=[-1], pad_token_id=0)
    return out[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_engine_generates_the_tokens_of_hf_generate(name, grafts):
    model, processor = load_for_inference(grafts[name], device="cpu", dtype="float32")
    scramble(model)
    path = image_path_for(model)
    prompts = [prepare(processor, conv, images, image_path=path) for conv, images in CASES]
    engine = Engine(model, processor.tokenizer, EngineConfig(max_batch_size=4, max_seq_len=512, sync_every=3),
                    eos_token_ids=[-1])
    params = SamplingParams(max_new_tokens=6)
    sequences = [engine.add(p.input_ids, params, **(p.pixels or {})) for p in prompts]
    while engine.has_work():
        engine.step()
    with torch.no_grad():
        expected = [_hf_greedy(model, p, 6) for p in prompts]
    assert [s.output_ids for s in sequences] == expected
    # The images reach the answer: another image changes the greedy tokens of the first prompt.
    other = prepare(processor, CASES[0][0], [BLUE], image_path=path)
    with torch.no_grad():
        assert _hf_greedy(model, other, 6) != expected[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_serve_answers_one_image_request_like_the_library(name, grafts):
    from openai import OpenAI
    from serving import KEY, data_url, start_server

    server = start_server(grafts[name])
    info = next(server)
    try:
        client = OpenAI(base_url=info["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(RED)}},
                                                 {"type": "text", "text": "what colour is this"}]}]
        reply = client.chat.completions.create(model=info["model"], messages=messages, max_tokens=5, temperature=0)
        model, processor = info["hf"]
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is this"}]}]
        expected = generate(model, processor, [conversation], [[RED]], max_new_tokens=5, backend="hf")[0]
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.prompt_tokens == expected.prompt_tokens
    finally:
        next(server, None)


def test_onnx_export_refuses_other_families_by_name(grafts, tmp_path):
    from vlmgraft.errors import VlmgraftError
    from vlmgraft.export.onnx_export import export_onnx

    with pytest.raises(VlmgraftError, match="SmolVLM family only.*llava graft.*LlavaForConditionalGeneration"):
        export_onnx(str(grafts["llava"]), tmp_path / "onnx", log=lambda *_: None)
    assert not (tmp_path / "onnx").exists()
