"""Write Samples in the reader formats (Cauldron parquet, ms-swift jsonl, messages jsonl).

Used by the shapes world, the benchmark and tests, and handy for converting between formats: whatever is written
here reads back into the same conversations and images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from vlmgraft.data.sample import Sample
from vlmgraft.data.source import IMAGE_TAG


def encode_image(image: Image.Image, image_format: str = "PNG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **({"quality": quality} if image_format.upper() == "JPEG" else {}))
    return buffer.getvalue()


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(IMAGE_TAG if p.get("type") == "image" else p.get("text", "") for p in content)


def _pairs(sample: Sample) -> tuple[str | None, list[tuple[str, str]]]:
    """(system, [(user text with <image> tags, assistant text)]) of a sample that alternates user/assistant."""
    system, pairs, question = None, [], None
    for message in sample.messages:
        if message["role"] == "system":
            system = _text(message["content"])
        elif message["role"] == "user":
            question = _text(message["content"])
        elif message["role"] == "assistant" and question is not None:
            pairs.append((question, _text(message["content"])))
            question = None
    return system, pairs


def write_cauldron(samples: list[Sample], path: str | Path, image_format: str = "PNG", quality: int = 90,
                   row_group_size: int = 64) -> Path:
    """One parquet file: `images` (list of {bytes, path}) + `texts` (list of {user, assistant, source})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, texts = [], []
    for sample in samples:
        _, pairs = _pairs(sample)
        images.append([{"bytes": encode_image(im, image_format, quality), "path": None} for im in sample.images])
        texts.append([{"user": q.replace(IMAGE_TAG, "").strip(), "assistant": a, "source": sample.source}
                      for q, a in pairs])
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    text_type = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))
    table = pa.table({"images": pa.array(images, type=image_type), "texts": pa.array(texts, type=text_type)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _save_images(sample: Sample, image_dir: Path, row: int, image_format: str) -> list[str]:
    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for k, image in enumerate(sample.images):
        name = f"{row:06d}_{k}.{'jpg' if image_format.upper() == 'JPEG' else image_format.lower()}"
        image.save(image_dir / name, image_format)
        names.append(name)
    return names


def write_swift(samples: list[Sample], path: str | Path, image_format: str = "PNG") -> Path:
    """ms-swift jsonl: query/response/history with `<image>` tags; images saved under `images/` beside the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row, sample in enumerate(samples):
            system, pairs = _pairs(sample)
            names = _save_images(sample, path.parent / "images", row, image_format)
            record = {"query": pairs[-1][0], "response": pairs[-1][1], "history": [list(p) for p in pairs[:-1]],
                      "images": [f"images/{n}" for n in names]}
            if system:
                record["system"] = system
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_messages(samples: list[Sample], path: str | Path, image_format: str = "PNG") -> Path:
    """messages jsonl with `{"type": "image", "image": "images/…"}` parts; images saved beside the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row, sample in enumerate(samples):
            names = iter(_save_images(sample, path.parent / "images", row, image_format))
            messages = []
            for message in sample.messages:
                content = message["content"]
                if isinstance(content, list):
                    content = [{"type": "image", "image": f"images/{next(names)}"} if p.get("type") == "image"
                               else {"type": "text", "text": p.get("text", "")} for p in content]
                messages.append({"role": message["role"], "content": content})
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path
