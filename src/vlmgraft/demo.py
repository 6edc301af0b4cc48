"""`vlmgraft demo`: the seeds' whole story in miniature, offline, on a laptop CPU, through the real code paths.

1. make shapes-world data;  2. train a tiny SmolVLM-style donor on English captions only, so its vision tower learns
to see;  3. teach a tiny Qwen3-style LLM Chinese about colours and shapes from text alone (no images);  4. graft the
donor's vision onto the LLM with the same `build` as `vlmgraft build`;  5. align the connector only on a little Chinese
VQA with the same `train` as `vlmgraft train`;  6. evaluate held-out Chinese VQA before alignment, after it, and with
the images replaced by noise; save a picture of answers and one `detect` result;  7. leave the grafted model behind
for `vlmgraft chat`.

Each step writes its result under `--out` and is skipped when that result is already there, so an interrupted demo
continues where it stopped; `--force` starts over.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmgraft.errors import VlmgraftError

log = logging.getLogger(__name__)
DEMO_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
QUESTION_KIND = "colour"


@dataclass(frozen=True)
class DemoSize:
    captions: int
    donor_steps: int
    text_pairs: int
    llm_steps: int
    vqa_train: int
    align_steps: int
    test: int


# Sizes that reach the demo's accuracy target. The donor needs ~1200 caption steps before it tells yellow from red:
# with 600 its captions already depend on the image (vision probe gap ~0.45) but alignment stalls near 72%, because
# the tower still maps yellow and red close together. --quick only evaluates fewer held-out images.
FULL = DemoSize(captions=1200, donor_steps=1200, text_pairs=1200, llm_steps=300, vqa_train=600, align_steps=300,
                test=200)
QUICK = DemoSize(captions=1200, donor_steps=1200, text_pairs=1200, llm_steps=300, vqa_train=600, align_steps=300,
                 test=64)


def _world(seed: int):
    from vlmgraft.data.shapes import ShapesWorld

    return ShapesWorld(image_size=64, palette=("red", "green", "blue", "yellow"), max_shapes=1, noise=0.1, seed=seed)


def _train_config(**kwargs):
    from vlmgraft.train.config import DataSettings, TrainConfig

    steps = kwargs["max_steps"]
    return TrainConfig(bf16=False, report_to=["none"], logging_steps=10, per_device_train_batch_size=16,
                       per_device_eval_batch_size=16, warmup_ratio=0.1, weight_decay=0.0, num_sample_images=0,
                       save_total_limit=1, eval_steps=steps, save_steps=steps,
                       data_settings=DataSettings(num_workers="0", eval_size=16, max_length=512), **kwargs)


def step_data(out: Path, size: DemoSize, seed: int) -> dict[str, str]:
    """Captions in English (donor), VQA in Chinese (alignment and held-out test)."""
    world = _world(seed)
    data = out / "data"
    return {
        "captions_en": str(world.write(data / "captions-en", "messages", size.captions, lang="en", task="caption")),
        "vqa_zh_train": str(world.write(data / "vqa-zh-train", "messages", size.vqa_train, lang="zh",
                                        task=QUESTION_KIND)),
        "vqa_zh_test": str(world.write(data / "vqa-zh-test", "messages", size.test, lang="zh", task=QUESTION_KIND,
                                       start=100_000)),
    }


def step_donor(out: Path, captions: str, size: DemoSize, seed: int) -> Path:
    """A SmolVLM-style donor trained end to end on English captions: its SigLIP-style tower learns colours."""
    from vlmgraft.fixtures.models import save_tiny_donor
    from vlmgraft.train.run import train

    init = save_tiny_donor(out / "donor-init", vision=DEMO_VISION, tile_px=32, longest_edge=64, seed=seed)
    config = _train_config(model=str(init), data=captions, output_dir=str(out / "runs" / "donor"), stage="full",
                           learning_rate=5e-3, max_steps=size.donor_steps, seed=seed)
    return train(config, force=True, echo=log.info).final_dir


def _chat_pairs(world, tokenizer, n: int) -> list[dict]:
    """Text-only Chinese: a described scene and a question → the answer. No image anywhere.

    The prompt is rendered by the LLM's own template exactly as inference renders it (thinking switched off), and
    TRL appends the end-of-turn token to the completion, so the model learns to answer and stop.
    """
    rows = []
    for index in range(n):
        scene = world.scene(200_000 + index)
        kind = ("colour", "colour", "shape")[index % 3]
        question, answer = world.question(scene, kind, "zh", varied=True)
        messages = [{"role": "user", "content": scene.caption("zh") + question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                               enable_thinking=False)
        rows.append({"prompt": prompt, "completion": answer})
    return rows


def step_llm(out: Path, size: DemoSize, seed: int) -> Path:
    """A tiny Qwen3-style LLM taught Chinese about colours and shapes with TRL's SFT (completion-only loss)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from vlmgraft.fixtures.models import save_tiny_llm

    init = save_tiny_llm(out / "llm-init", family="qwen3", tied=True, hidden_size=128, layers=2, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(init, use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(init)
    dataset = Dataset.from_list(_chat_pairs(_world(seed), tokenizer, size.text_pairs))
    args = SFTConfig(output_dir=str(out / "runs" / "llm"), max_steps=size.llm_steps, per_device_train_batch_size=32,
                     learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=25,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=seed,
                     dataloader_num_workers=0)
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    final = out / "llm"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    return final


def step_graft(out: Path, donor: Path, llm: Path) -> Path:
    from vlmgraft.graft.build import BuildOptions, build

    graft = out / "graft"
    build(BuildOptions(vision=str(donor), llm=str(llm), out=graft, dtype="float32", force=True), log=log.info)
    return graft


def step_align(out: Path, graft: Path, vqa_train: str, size: DemoSize, seed: int) -> Path:
    from vlmgraft.train.run import train

    config = _train_config(model=str(graft), data=vqa_train, output_dir=str(out / "runs" / "align"), stage="align",
                           learning_rate=1e-2, max_steps=size.align_steps, seed=seed)
    result = train(config, force=True, echo=log.info)
    model_dir = out / "qwen3-smvl-demo"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(result.final_dir, model_dir)
    return model_dir


def evaluate(model_dir: Path, samples, out: Path, tasks: list[str]) -> dict:
    from vlmgraft.eval.runner import run_eval

    return run_eval(model_dir, samples, tasks=tasks, out_dir=out, batch_size=32, max_new_tokens=8, device="cpu",
                    log=log.info)


def save_answer_grid(eval_dir: Path, samples, path: Path, n: int = 8) -> None:
    """A strip of test images with each answer and the reference under it."""
    from PIL import Image, ImageDraw

    lines = (eval_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    vqa = [(r, sample) for r, sample in zip((r for r in map(json.loads, lines) if r["task"] == "vqa"), samples,
                                             strict=False)]
    by_reference: dict[str, list] = {}
    for pair in vqa:  # a strip with every colour in it, two of each, in test order
        by_reference.setdefault(pair[0]["reference"], []).append(pair)
    chosen = [pairs[i] for i in range(2) for pairs in by_reference.values() if i < len(pairs)][:n]
    records, samples = [r for r, _ in chosen], [s for _, s in chosen]
    tile = 128
    canvas = Image.new("RGB", (tile * len(records), tile + 44), "white")
    draw = ImageDraw.Draw(canvas)
    from vlmgraft.data.shapes import COLOURS
    from vlmgraft.infer.detect import find_cjk_font, load_font

    font = load_font(14, cjk=True)
    if find_cjk_font() is None:  # no CJK glyphs on this machine: show the English colour names instead
        english = {zh[0]: en for en, zh in COLOURS.items()}
        records = [{**r, "prediction": english.get(r["prediction"].strip(), r["prediction"].strip()),
                    "reference": english.get(r["reference"], r["reference"])} for r in records]
    for i, (record, sample) in enumerate(zip(records, samples, strict=False)):
        canvas.paste(sample.images[0].resize((tile, tile)), (i * tile, 0))
        ok = record["match"] is not None
        draw.text((i * tile + 4, tile + 2), f"A: {record['prediction']}", fill="green" if ok else "red", font=font)
        draw.text((i * tile + 4, tile + 22), f"ref: {record['reference']}", fill="black", font=font)
    canvas.save(path)


def step_detect(model_dir: Path, sample, out: Path) -> dict:
    """One grounding request through `detect`'s own code. A connector-only graft was never taught to ground, so
    expect no boxes, or an answer that does not parse: the point is the path, not the score."""
    from vlmgraft.infer.detect import detect, draw_boxes
    from vlmgraft.infer.model import load_for_inference

    image = sample.images[0]
    image.save(out / "detect_input.png")
    model, processor = load_for_inference(model_dir, device="cpu")
    found = detect(model, processor, image, ["圆形", "正方形"], max_new_tokens=48)
    draw_boxes(image, found.boxes).save(out / "detect.png")
    return {"answer": found.raw, "parsed": found.parsed, "boxes": found.boxes, "png": str(out / "detect.png")}


def run_demo(out: str | Path = "vlmgraft-demo", quick: bool = False, force: bool = False, seed: int = 0) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and force:
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()) and not (out / "demo_state.json").exists():
        raise VlmgraftError(f"{out} exists and is not a vlmgraft demo folder; pass --force or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "demo_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    size = QUICK if quick else FULL
    start = time.perf_counter()
    earlier = sum(state.get("seconds", {}).values())  # steps done by an interrupted earlier invocation

    def done(key, value):
        state[key] = value
        state_path.write_text(json.dumps(state, indent=2, ensure_ascii=False, default=str))
        return value

    def step(key: str, title: str, fn):
        if key in state:
            print(f"[skip] {title} (done before)")
            return state[key]
        print(f"[{len(state.get('seconds', {})) + 1}] {title} …", flush=True)
        began = time.perf_counter()
        value = fn()
        state.setdefault("seconds", {})[key] = round(time.perf_counter() - began, 1)
        return done(key, value)

    data = step("data", "making shapes-world data (English captions, Chinese VQA)",
                lambda: step_data(out, size, seed))
    donor = Path(step("donor", "training a tiny SmolVLM-style donor on English captions",
                      lambda: str(step_donor(out, data["captions_en"], size, seed))))
    llm = Path(step("llm", "teaching a tiny Qwen3-style LLM Chinese from text alone",
                    lambda: str(step_llm(out, size, seed))))
    graft = Path(step("graft", "grafting the donor's vision onto the LLM (vlmgraft build)",
                      lambda: str(step_graft(out, donor, llm))))

    from vlmgraft.data.spec import load_samples

    test = load_samples(data["vqa_zh_test"], shuffle=False)
    before = step("before", "evaluating Chinese VQA before alignment",
                  lambda: evaluate(graft, test, out / "eval-before", ["vqa"])["vqa"]["accuracy"])
    model_dir = Path(step("align", "aligning the connector only on Chinese VQA (vlmgraft train, stage align)",
                          lambda: str(step_align(out, graft, data["vqa_zh_train"], size, seed))))
    after = evaluate(model_dir, test, out / "eval-after", ["vqa", "ablation"])
    save_answer_grid(out / "eval-after", test, out / "answers.png")
    detect_result = step_detect(model_dir, test[0], out)
    results = {"accuracy_before": before, "accuracy_after": after["vqa"]["accuracy"],
               "accuracy_ablated": after["ablation"]["accuracy_noise"], "chance": 0.25,
               "seconds": round(earlier + time.perf_counter() - start, 1),
               "step_seconds": state.get("seconds", {}), "quick": quick, "size": asdict(size),
               "model": str(model_dir), "answers_png": str(out / "answers.png"), "detect": detect_result}
    (out / "demo_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    print(f"\n{'':<28}{'held-out Chinese VQA accuracy':>30}\n"
          f"{'before alignment':<28}{before:>30.1%}\n{'after alignment':<28}{results['accuracy_after']:>30.1%}\n"
          f"{'after, images → noise':<28}{results['accuracy_ablated']:>30.1%}\n{'chance':<28}{0.25:>30.1%}\n"
          f"\nmodel: {model_dir}   (try: vlmgraft chat {model_dir} --image {out / 'detect_input.png'} "
          f"--prompt 图中形状是什么颜色？)\npicture: {out / 'answers.png'}   took {results['seconds']} s")
    return results


def register(sub) -> None:
    cmd = sub.add_parser("demo", help="the whole graft story offline on a CPU in a few minutes")
    cmd.add_argument("--out", default="vlmgraft-demo", help="folder for data, models, pictures and results")
    cmd.add_argument("--quick", action="store_true", help="fewer samples and steps (CI)")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--force", action="store_true", help="start over in a non-empty --out")
    cmd.set_defaults(func=lambda args: 0 if run_demo(args.out, args.quick, args.force, args.seed) else 1)
