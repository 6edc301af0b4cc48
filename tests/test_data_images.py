"""Image decoding: every odd mode becomes upright RGB, every bad file is skipped with its reason and path, and skip
counts add up across DataLoader worker processes."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmgraft.data.dataset import SampleDataset
from vlmgraft.data.images import ImagePolicy, ImageSkipped, load_image
from vlmgraft.data.spec import build_dataset, open_mixture
from vlmgraft.data.tally import Tally


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    loaded = load_image(_jpeg(image, exif=exif.tobytes(), quality=95))
    assert loaded.size == (20, 40)
    top, bottom = np.asarray(loaded)[5, 10], np.asarray(loaded)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("RGBA", (16, 16), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent → white
    (lambda: Image.new("RGBA", (16, 16), (255, 0, 0, 255)), (255, 0, 0)),
    (lambda: Image.new("LA", (16, 16), (0, 0)), (255, 255, 255)),
    (lambda: Image.new("L", (16, 16), 100), (100, 100, 100)),
    (lambda: Image.new("1", (16, 16), 1), (255, 255, 255)),
    (lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)), (128, 128, 128)),  # 16-bit, not clipped
    (lambda: Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), "F"), (127, 127, 127)),
])
def test_modes_become_rgb(make, expected):
    image = make()
    data = _jpeg(image) if image.mode == "CMYK" else _png(image) if image.mode != "F" else None
    loaded = load_image(data if data is not None else image)
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded)[8, 8].astype(int) - np.array(expected)).max() <= 3


def test_palette_with_transparency_composites_on_white():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))
    data = _png(image, transparency=0)  # palette index 0 (red) is transparent
    pixels = np.asarray(load_image(data))
    assert tuple(pixels[8, 12]) == (255, 255, 255) and tuple(pixels[8, 2]) == (0, 255, 0)


def test_every_source_kind_decodes(tmp_path):
    image = Image.new("RGB", (20, 10), (1, 2, 3))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(_png(image))
    url = "data:image/png;base64," + base64.b64encode(_png(image)).decode()
    for source, base in [("sub/a.png", tmp_path), (str(tmp_path / "sub" / "a.png"), None),
                         ((tmp_path / "sub" / "a.png").as_uri(), None), (url, None),
                         ({"bytes": _png(image), "path": "x.png"}, None),
                         ({"bytes": None, "path": "sub/a.png"}, tmp_path),
                         (_png(image), None), (image, None)]:
        assert load_image(source, base_dir=base).size == (20, 10)


def test_bad_images_are_skipped_with_reason_and_path(tmp_path, monkeypatch):
    good = _jpeg(Image.new("RGB", (64, 64), (10, 200, 30)))
    cases = {"truncated": good[: len(good) // 2], "corrupt": b"\x89PNG\r\n\x1a\n not really a png",
             "too_small": _png(Image.new("RGB", (1, 1)))}
    for reason, data in cases.items():
        path = tmp_path / f"{reason}.img"
        path.write_bytes(data)
        with pytest.raises(ImageSkipped) as err:
            load_image(path)
        assert err.value.reason == reason and str(path) in err.value.where
    with pytest.raises(ImageSkipped) as err:
        load_image(tmp_path / "absent.png")
    assert err.value.reason == "missing" and "absent.png" in str(err.value)
    with pytest.raises(ImageSkipped) as err:  # the policy's pixel limit, checked before decoding
        load_image(good, policy=ImagePolicy(max_pixels=64 * 63))
    assert err.value.reason == "too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own bomb guard fires on open: same reason
    with pytest.raises(ImageSkipped) as err:
        load_image(good)
    assert err.value.reason == "too_large"
    with pytest.raises(ImageSkipped) as err:
        load_image("https://example.com/a.png")
    assert err.value.reason == "remote_url"


def _write_bad_swift(folder) -> tuple:
    images = folder / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(images / "ok.png")
    (images / "trunc.jpg").write_bytes(_jpeg(Image.new("RGB", (64, 64)))[:200])
    (images / "bad.png").write_bytes(b"garbage")
    Image.new("RGB", (1, 1)).save(images / "tiny.png")
    names = ["ok.png", "trunc.jpg", "bad.png", "tiny.png", "gone.png", "ok.png", "ok.png", "ok.png"]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps({"query": "<image>colour?", "response": "red", "images": [f"images/{n}"]}) + "\n"
                            for n in names))
    return path, names


def test_dataset_counts_bad_images_across_worker_processes(tmp_path):
    path, names = _write_bad_swift(tmp_path)
    train, _ = build_dataset(str(path), seed=0)
    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=2, collate_fn=lambda batch: batch)
    seen = [s for batch in loader for s in batch]
    assert len(seen) == len(names)
    assert sum(s is not None for s in seen) == 4  # 4 good rows arrive; 4 bad ones arrive as None
    counts = train.skips.counts()  # read in the main process: the workers' counts are included
    assert counts == {"image truncated": 1, "image corrupt": 1, "image too_small": 1, "image missing": 1}
    examples = " ".join(e for reason in counts for e in train.skips.examples(reason))
    for name in ("trunc.jpg", "bad.png", "tiny.png", "gone.png"):
        assert name in examples
    assert "data.jsonl:" in examples  # each skip names the row it came from too
    from vlmgraft.data.report import data_report

    assert "skipped rows: 4" in data_report(train) and "image corrupt: 1" in data_report(train)


def test_tally_merges_worker_shards_and_survives_pickling():
    import pickle

    tally = Tally("t")
    tally.add("a", "first")
    clone = pickle.loads(pickle.dumps(tally))
    assert clone.counts() == {}  # a copy in another process starts empty; the owner keeps its own numbers
    assert tally.counts() == {"a": 1} and "a: 1" in tally.report()


def test_map_dataset_never_raises_on_bad_rows(tmp_path):
    path, _ = _write_bad_swift(tmp_path)
    sources, _ = open_mixture(str(path))
    dataset = SampleDataset(sources, [(0, i) for i in range(len(sources[0]))])
    items = [dataset[i] for i in range(len(dataset))]
    assert [item is None for item in items] == [False, True, True, True, True, False, False, False]
