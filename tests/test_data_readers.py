"""Readers (Cauldron, ms-swift, messages, COCO → grounding), SPEC detection, mixtures, splits and streaming."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlmgraft.data.messages import MessagesSource
from vlmgraft.data.shapes import ShapesWorld
from vlmgraft.data.spec import build_dataset, detect_format, load_samples, open_mixture, parse_spec
from vlmgraft.data.swift import SwiftSource
from vlmgraft.errors import VlmgraftError

WORLD = ShapesWorld(image_size=48, max_shapes=3, seed=3)


def _texts(sample):
    return [(m["role"], m["content"] if isinstance(m["content"], str)
             else ["<img>" if p["type"] == "image" else p["text"] for p in m["content"]]) for m in sample.messages]


@pytest.mark.parametrize("fmt", ["cauldron", "swift", "messages"])
def test_written_formats_read_back_the_same_conversations(tmp_path, fmt):
    from vlmgraft.data.shapes_io import world_samples

    samples = world_samples(WORLD, 6, "zh", "mixed")
    path = WORLD.write(tmp_path, fmt, 6, lang="zh", task="mixed")
    assert detect_format(str(path)) == fmt
    loaded = load_samples(str(path), shuffle=False)
    assert len(loaded) == 6
    for got, want in zip(loaded, samples, strict=True):
        assert _texts(got) == _texts(want)
        assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))
        assert got.origin and got.source


def test_swift_rows_rejected_with_line_numbers(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    rows = [
        {"query": "<image>what?", "response": "red", "images": ["a.png"]},  # line 1 ok
        {"query": "<image><image>two?", "response": "x", "images": ["a.png"]},  # 2 tags, 1 image
        "not json at all",
        {"query": "hi", "response": "yo", "history": [["<image>first", "ok"]], "images": ["a.png"],
         "system": "be brief"},  # ok: the tag is in the history
        {"query": "hi", "response": 3},
        {"query": "q", "response": "a", "history": "nope"},
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n\n")
    source = SwiftSource(path)
    assert len(source) == 2
    problems = {p.origin: p.message for p in source.problems}
    assert set(problems) == {f"{path}:2", f"{path}:3", f"{path}:5", f"{path}:6"}
    assert "2 <image> tag(s) but 1 image(s)" in problems[f"{path}:2"]
    sample = source.get(1)
    assert sample.origin == f"{path}:4"
    assert _texts(sample) == [("system", "be brief"), ("user", ["<img>", "first"]), ("assistant", "ok"),
                              ("user", ["hi"]), ("assistant", "yo")]


def test_messages_parts_urls_and_images_column(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 12), (255, 0, 0)).save(tmp_path / "img" / "r.png")
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (0, 0, 255)).save(buffer, "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    rows = [
        {"messages": [{"role": "system", "content": "sys"},
                      {"role": "user", "content": [{"type": "image", "image": "img/r.png"},
                                                   {"type": "image_url", "image_url": {"url": data_url}},
                                                   {"type": "image_url", "image_url": {
                                                       "url": (tmp_path / "img" / "r.png").as_uri()}},
                                                   {"type": "text", "text": "three?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]},
        {"messages": [{"role": "user", "content": "<image>and this?"}, {"role": "assistant", "content": "ok"}],
         "images": ["img/r.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                      {"role": "assistant", "content": "a"}], "images": ["img/r.png", "img/r.png"]},  # 1 vs 2
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                         "content": [{"type": "image", "image": "img/r.png"}]}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    source = MessagesSource(path)
    assert len(source) == 2 and {p.origin for p in source.problems} == {f"{path}:3", f"{path}:4", f"{path}:5"}
    first = source.get(0)
    assert [im.size for im in first.images] == [(16, 12), (10, 10), (16, 12)]
    assert _texts(first) == [("system", "sys"), ("user", ["<img>", "<img>", "<img>", "three?"]), ("assistant", "yes")]
    assert _texts(source.get(1))[0] == ("user", ["<img>", "and this?"])


def _cauldron_table(n: int, start: int, raw_bytes: bool = False) -> pa.Table:
    images, texts = [], []
    for i in range(start, start + n):
        scene = WORLD.scene(i)
        buffer = io.BytesIO()
        scene.image.save(buffer, "PNG")
        images.append([buffer.getvalue()] * 2 if raw_bytes else [{"bytes": buffer.getvalue(), "path": None}] * 2)
        texts.append([{"user": "colour?", "assistant": scene.shapes[0].colour, "source": "t"},
                      {"user": "count?", "assistant": str(len(scene.shapes)), "source": "t"}])
    return pa.table({"images": images, "texts": texts})


def test_cauldron_folder_subsets_first_image_and_arrow_folder(tmp_path):
    root = tmp_path / "the_cauldron"
    (root / "alpha").mkdir(parents=True)
    (root / "beta").mkdir()
    pq.write_table(_cauldron_table(3, 0), root / "alpha" / "train-0.parquet")
    pq.write_table(_cauldron_table(2, 3), root / "alpha" / "train-1.parquet")
    pq.write_table(_cauldron_table(4, 5, raw_bytes=True), root / "beta" / "train-0.parquet")
    sources, _ = open_mixture(str(root))
    assert [(s.name, len(s)) for s in sources] == [("alpha", 5), ("beta", 4)]
    sample = sources[0].get(4)
    assert sample.origin.endswith("train-1.parquet[1]") and len(sample.images) == 2
    assert _texts(sample)[:2] == [("user", ["<img>", "<img>", "colour?"]),
                                  ("assistant", WORLD.scene(4).shapes[0].colour)]
    assert len(_texts(sample)) == 4  # both turns; images only in the first
    picked, _ = open_mixture({"path": str(root), "subsets": ["beta"], "images": "first"})
    assert [s.name for s in picked] == ["beta"] and len(picked[0].get(0).images) == 1
    with pytest.raises(VlmgraftError, match="subset.*gamma.*available"):
        open_mixture({"path": str(root), "subsets": ["gamma"]})

    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset(_cauldron_table(3, 0)).save_to_disk(str(saved))
    [arrow_source] = open_mixture(str(saved))[0]
    assert len(arrow_source) == 3 and arrow_source.get(2).images[0].size == (48, 48)


def test_cauldron_image_paths_resolve_against_the_data_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "pics").mkdir(parents=True)
    Image.new("RGB", (30, 20), (0, 0, 200)).save(data / "pics" / "a.png")
    table = pa.table({"images": [[{"bytes": None, "path": "pics/a.png"}]],
                      "texts": [[{"user": "colour?", "assistant": "blue", "source": "t"}]]})
    pq.write_table(table, data / "train.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory holds no pics/ folder
    [source] = open_mixture(str(data / "train.parquet"))[0]
    assert source.get(0).images[0].size == (30, 20)
    import datasets

    datasets.Dataset(table).save_to_disk(str(data / "saved"))
    (data / "saved" / "pics").mkdir()
    Image.new("RGB", (30, 20)).save(data / "saved" / "pics" / "a.png")
    [arrow_source] = open_mixture(str(data / "saved"))[0]
    assert arrow_source.get(0).images[0].size == (30, 20)


def test_cauldron_bad_layout_and_offline_hub_give_clear_errors(tmp_path):
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(VlmgraftError, match="Cauldron layout.*columns found.*answer"):
        len(open_mixture(str(tmp_path / "x.parquet"))[0][0])
    with pytest.raises(VlmgraftError, match="offline"):  # HF_HUB_OFFLINE=1 in conftest
        open_mixture({"path": "HuggingFaceM4/the_cauldron", "subsets": ["ai2d"]})


def test_spec_detection_forcing_and_errors(tmp_path):
    path = WORLD.write(tmp_path / "m", "messages", 3)
    assert parse_spec(f"swift:{path}")[0].format == "swift"
    with pytest.raises(VlmgraftError, match="unknown data format 'parquet'"):
        parse_spec(f"parquet:{path}")
    with pytest.raises(VlmgraftError):  # forced to the wrong format: every row is rejected, with the reason
        open_mixture(f"swift:{path}")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(VlmgraftError, match=r"odd.jsonl:1.*keys \['completion', 'prompt'\]"):
        detect_format(str(odd))
    with pytest.raises(VlmgraftError, match="does not exist"):
        load_samples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(VlmgraftError, match="do not apply to the swift format"):
        open_mixture({"path": str(WORLD.write(tmp_path / "s", "swift", 2)), "lang": "zh"})
    with pytest.raises(VlmgraftError, match="holds shapes.jsonl: pass that file"):  # the folder `data shapes` wrote
        load_samples(str(tmp_path / "s"))


def _mixture(tmp_path) -> str:
    WORLD.write(tmp_path / "a", "swift", 10)
    WORLD.write(tmp_path / "b", "cauldron", 4)
    spec = tmp_path / "mix.yaml"
    spec.write_text("sources:\n  - {path: a/shapes.jsonl, weight: 0.5, name: small}\n"
                    "  - path: b/shapes.parquet\n    weight: 2.5\n")
    return str(spec)


def test_yaml_mixture_weights_split_and_seeded_order(tmp_path):
    spec = _mixture(tmp_path)
    full, _ = build_dataset(spec, seed=1)
    assert full.source_counts() == {"small": 5, "shapes": 10}  # round(0.5 × 10) and round(2.5 × 4)
    train, evaluation = build_dataset(spec, seed=1, eval_size=3)
    held = {tuple(p) for p in evaluation.index.tolist()}
    assert len(held) == 3
    # training is the same seeded order minus every copy of an evaluation row
    assert train.index.tolist() == [p for p in full.index.tolist() if tuple(p) not in held]
    again, _ = build_dataset(spec, seed=1)
    other, _ = build_dataset(spec, seed=2)
    assert np.array_equal(full.index, again.index) and not np.array_equal(full.index, other.index)
    assert [s.origin for s in load_samples(spec, limit=4, seed=1)] == \
           [s.origin for s in load_samples(spec, limit=4, seed=1)]


def test_streaming_shards_across_workers_and_holds_out_eval(tmp_path):
    path = WORLD.write(tmp_path, "swift", 12)
    stream, evaluation = build_dataset(str(path), streaming=True, eval_size=2, seed=0)
    held = {s.origin for s in evaluation.samples}
    assert len(held) == 2
    loader = torch.utils.data.DataLoader(stream, batch_size=3, num_workers=2, collate_fn=lambda b: b)
    seen = [s.origin for batch in loader for s in batch]
    assert sorted(seen) == sorted(f"{path}:{n}" for n in range(1, 13) if f"{path}:{n}" not in held)
    from vlmgraft.data.writers import write_cauldron

    parquet = write_cauldron(WORLD.vqa_samples(10), tmp_path / "c.parquet", row_group_size=3)  # 4 row groups
    stream, _ = build_dataset(str(parquet), streaming=True, seed=0)
    stream.set_epoch(1)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, collate_fn=lambda b: b)
    origins = [s.origin for batch in loader for s in batch]
    assert len(stream) == 10 and sorted(origins) == sorted(f"{parquet}[{i}]" for i in range(10))


def test_random_access_handle_is_closed_with_the_dataset(tmp_path):
    import gc
    import warnings

    path = WORLD.write(tmp_path, "messages", 3, lang="en", task="colour")
    source = MessagesSource(path)
    first = source.raw(0)
    source.close()
    assert source.raw(0) == first  # reopened on the next access
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del source
        gc.collect()
    # Only this source's file counts: other tests' leftovers (sockets, say) may also be collected here.
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and str(path) in str(w.message)]
