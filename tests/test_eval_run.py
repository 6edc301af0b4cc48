"""Evaluation with models: text parity with the base LLM, the vision ablation, and `vlmgraft eval` end to end."""

from __future__ import annotations

import json
import sys
import types

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmgraft.cli import main
from vlmgraft.data.sample import Sample
from vlmgraft.eval.parity import PARITY_PROMPTS, evaluate_parity, load_llm_like
from vlmgraft.eval.tasks import evaluate_ablation, noise_like
from vlmgraft.export.checkpoints import llm_of
from vlmgraft.grounding import format_boxes


def _image_sample(question: str, answer: str, image: Image.Image, source: str = "shapes") -> Sample:
    return Sample(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                            {"role": "assistant", "content": answer}], images=[image], source=source,
                  origin=f"{source}:{question}")


def test_parity_with_the_base_llm_is_exact_and_notices_a_changed_llm(tiny_dir, tiny_graft):
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_graft)
    assert llm_of(tiny_graft) == str(tiny_dir / "qwen3")
    llm, tokenizer = load_llm_like(llm_of(tiny_graft), torch.bfloat16, torch.float32)  # the graft is saved in bf16
    prompts = PARITY_PROMPTS[:2] + PARITY_PROMPTS[6:8]
    same = evaluate_parity(model, processor, llm, tokenizer, prompts, batch_size=2, max_new_tokens=3)
    assert same["same_prompt_tokens"] and same["identical_answers"] == 1.0 and same["changed_share"] == 0.0
    assert same["max_abs_logit_diff"] <= 1e-5

    with torch.no_grad():  # what LoRA training does to the language side, in miniature
        weight = model.model.text_model.layers[0].mlp.down_proj.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    changed = evaluate_parity(model, processor, llm, tokenizer, prompts, batch_size=2, max_new_tokens=3)
    assert changed["max_abs_logit_diff"] > 1e-3


class BrightnessModel(torch.nn.Module):
    """Answers "white" for a bright image and "black" otherwise: a model that demonstrably uses its image."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.words = {True: tokenizer("white", add_special_tokens=False).input_ids,
                      False: tokenizer("black", add_special_tokens=False).input_ids}
        self.pad = tokenizer.pad_token_id

    def generate(self, input_ids, pixel_values, pad_token_id=None, **kwargs):
        # Pixels are normalised to [-1, 1]: white is 1, black -1, uniform noise about 0.
        rows = [self.words[bool(tiles.mean() > 0.5)] for tiles in pixel_values]
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_ablation_measures_how_much_answers_depend_on_the_image(tiny_graft):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    white, black = Image.new("RGB", (64, 48), "white"), Image.new("RGB", (40, 40), "black")
    samples = [_image_sample("颜色？", "white", white), _image_sample("colour?", "black", black),
               _image_sample("颜色是什么？", "white", white), _image_sample("what colour?", "black", black)]
    result = evaluate_ablation(BrightnessModel(processor.tokenizer), processor, samples, batch_size=3)
    # Real images: all right. Noise reads as "not bright" → only the black ones stay right.
    assert result["n"] == 4 and result["accuracy_real"] == 1.0 and result["accuracy_noise"] == 0.5
    assert result["gap"] == 0.5 and result["answers_changed"] == 0.5
    noise = noise_like([white, black], seed=3)
    assert [im.size for im in noise] == [(64, 48), (40, 40)]
    assert noise[0].tobytes() == noise_like([white], seed=3)[0].tobytes() != noise_like([white], seed=4)[0].tobytes()


def test_eval_cli_end_to_end_on_the_tiny_graft(tiny_graft, tmp_path, monkeypatch):
    red, blue = Image.new("RGB", (64, 48), (220, 20, 20)), Image.new("RGB", (48, 48), (20, 20, 220))
    samples = [_image_sample("什么颜色？", "红色", red), _image_sample("what colour?", "blue", blue),
               _image_sample("找出圆", format_boxes([{"label": "圆", "box": [100, 100, 600, 600]}]), red),
               _image_sample("描述图片", "一张红色的图片，上面什么也没有，只有均匀的红色铺满整个画面。", red, "caption")]
    calls = []

    def load_samples(spec, limit=None, seed=0):
        calls.append((spec, limit, seed))
        return samples[:limit]

    monkeypatch.setitem(sys.modules, "vlmgraft.data.spec", types.SimpleNamespace(load_samples=load_samples))
    out = tmp_path / "report"
    code = main(["eval", str(tiny_graft), "--data", "shapes.yaml", "--limit", "4", "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu"])
    assert code == 0 and calls[-1] == ("shapes.yaml", 4, 0)
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["vqa", "grounding", "caption", "parity", "ablation"]
    assert results["vqa"]["n"] == 2 and results["grounding"]["images"] == 1 and results["caption"]["n"] == 1
    assert results["ablation"]["n"] == 2 and results["parity"]["identical_answers"] == 1.0
    assert results["parity"]["llm"] == llm_of(tiny_graft)
    assert json.loads((out / "eval_config.json").read_text())["routed"] == {"vqa": 2, "grounding": 1, "caption": 1}
    assert "| parity |" in (out / "results.md").read_text()
    assert (out / "grounding_iou_hist.png").exists() and (out / "ablation.png").exists()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4 + len(PARITY_PROMPTS) + 2


def test_eval_without_data_names_the_missing_flag(tiny_graft, capsys):
    assert main(["eval", str(tiny_graft), "--tasks", "vqa,grounding"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["eval", str(tiny_graft), "--tasks", "vqa,bleu", "--data", "x"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", str(tiny_graft), "--tasks", "parity", "--dtype", "fp64"]) == 2
    assert "--dtype 'fp64' is not one of bf16, bfloat16" in capsys.readouterr().err
