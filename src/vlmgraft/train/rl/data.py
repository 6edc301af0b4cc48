"""Readers for post-training data: preference pairs (DPO) and prompts with their ground truth (GRPO).

Preference rows, in any of three layouts (detected per row):
- TRL's: `prompt` (a message list, or a string), `chosen` / `rejected` (message lists or strings), optional `images`;
  image parts are `{"type": "image", "image": PATH}` as the `messages` reader takes them, or bare `{"type": "image"}`
  parts (or `<image>` tags) that take the `images` entries in order. This is also the layout of RLAIF-V
  (`HuggingFaceH4/rlaif-v_formatted`), whose parquet files hold the images as `{"bytes", "path"}` structs;
- TRL's implicit prompt: `chosen` / `rejected` whole conversations that share everything but their last turn;
- ms-swift's DPO jsonl: `messages` ending with the chosen answer, `rejected_response`, optional `images`.

Every row becomes `{"prompt": messages, "chosen": [assistant turn], "rejected": [assistant turn], "images": refs,
"origin": "file:line"}` with user image parts as bare `{"type": "image"}` and the refs, in order, in `images`
(relative paths resolved against the data file).

GRPO rows: ms-swift's `messages` ending with the user's turn, or TRL's `prompt` (message list or string), with
`image` / `images`; every other column (`solution`, `answer`, ...) is kept for the reward functions.

Bad rows are skipped and counted in a Tally with their file:line. Images are decoded later, when a batch is built.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

from vlmgraft.data.messages import MessagesSource
from vlmgraft.data.render import flatten_text
from vlmgraft.data.source import RowRejected, split_image_tags
from vlmgraft.data.tally import Tally
from vlmgraft.errors import VlmgraftError

# MessagesSource.parse reads only its arguments; this instance lends it without opening a file.
_MESSAGES = object.__new__(MessagesSource)


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """(origin, row, problem) for every row of a jsonl or parquet file; row is None when it cannot be parsed."""
    path = Path(path)
    if not path.is_file():
        raise VlmgraftError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row, None
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{number}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield origin, None, f"not valid JSON ({err})"
                continue
            if not isinstance(row, dict):
                yield origin, None, f"a row must be a JSON object, got {type(row).__name__}"
                continue
            yield origin, row, None


def resolve_ref(ref, base_dir: Path):
    """An image reference that no longer depends on the data file's folder, and fits in a JSON string."""
    if isinstance(ref, dict) and ref.get("bytes"):
        return "data:image;base64," + base64.b64encode(bytes(ref["bytes"])).decode("ascii")
    if isinstance(ref, dict) and ref.get("path"):
        ref = ref["path"]
    if isinstance(ref, (bytes, bytearray)):
        return "data:image;base64," + base64.b64encode(bytes(ref)).decode("ascii")
    if isinstance(ref, str) and not ref.startswith(("data:", "http://", "https://", "file://")):
        path = Path(ref).expanduser()
        return str(path if path.is_absolute() else base_dir / path)
    return ref


def _images_column(row: dict, origin: str) -> list:
    column = row.get("images")
    if column is None and row.get("image") is not None:
        column = [row["image"]]
    column = column or []
    if isinstance(column, (str, dict)):
        column = [column]
    if not isinstance(column, list):
        raise RowRejected(origin, "field 'images' must be a list")
    return column


def parse_prompt(prompt, column: list, origin: str, base_dir: Path) -> tuple[list[dict], list]:
    """A prompt (message list or string) and the row's `images` → (messages, resolved image refs)."""
    if isinstance(prompt, str):
        parts = split_image_tags(prompt)
        if column and not any(p["type"] == "image" for p in parts):  # TRL puts the images before the text
            parts = [{"type": "image"} for _ in column] + parts
        prompt = [{"role": "user", "content": parts}]
    if not isinstance(prompt, list) or not prompt:
        raise RowRejected(origin, "field 'prompt' must be a non-empty message list or a string")
    if prompt[0].get("role") == "user" and isinstance(prompt[0].get("content"), str) and column and \
            "<image>" not in prompt[0]["content"] and not any(isinstance(m.get("content"), list) for m in prompt):
        prompt = [{**prompt[0], "content": [{"type": "image"} for _ in column]
                   + [{"type": "text", "text": prompt[0]["content"]}]}, *prompt[1:]]
    messages, refs = MessagesSource.parse(_MESSAGES, {"messages": prompt, "images": column}, origin)
    return messages, [resolve_ref(ref, base_dir) for ref in refs]


def completion(value, origin: str, field: str) -> list[dict]:
    """`chosen` / `rejected`: a string or a message list whose turns are the model's (text only)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise RowRejected(origin, f"field {field!r} must be a string or a non-empty message list")
    turns = []
    for turn, message in enumerate(value):
        if message.get("role") not in ("assistant", "tool"):
            raise RowRejected(origin, f"{field} message {turn} has role {message.get('role')!r}; a completion "
                                      f"holds the model's turns")
        content = message.get("content")
        if isinstance(content, list) and any(p.get("type") != "text" for p in content if isinstance(p, dict)):
            raise RowRejected(origin, f"{field} message {turn}: a completion holds text only")
        turns.append({**message, "content": flatten_text(content)})
    if turns[-1]["role"] != "assistant":
        raise RowRejected(origin, f"field {field!r} must end with an assistant turn")
    return turns


def parse_preference(row: dict, origin: str, base_dir: Path) -> dict:
    column = _images_column(row, origin)
    if "rejected_response" in row:  # ms-swift
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) or \
                messages[-1].get("role") != "assistant":
            raise RowRejected(origin, "ms-swift DPO row: 'messages' must end with the chosen assistant turn")
        prompt, chosen, rejected = messages[:-1], [messages[-1]], row["rejected_response"]
    elif "chosen" in row and "rejected" in row:
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if prompt is None:  # implicit prompt: two whole conversations that differ in their last turn
            if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1
                    and chosen[:-1] == rejected[:-1]):
                raise RowRejected(origin, "no 'prompt': 'chosen' and 'rejected' must be conversations that share "
                                          "every turn but the last")
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    else:
        raise RowRejected(origin, f"not a preference row: expected prompt/chosen/rejected or messages/"
                                  f"rejected_response (keys found: {sorted(row)})")
    messages, refs = parse_prompt(prompt, column, origin, base_dir)
    if messages[-1]["role"] not in ("user", "tool"):
        raise RowRejected(origin, f"the prompt must end with the user's turn, not {messages[-1]['role']!r}")
    return {"prompt": messages, "chosen": completion(chosen, origin, "chosen"),
            "rejected": completion(rejected, origin, "rejected"), "images": refs, "origin": origin}


def read_rows(path: str | Path, parse, skips: Tally | None = None, what: str = "row") -> tuple[list[dict], Tally]:
    """Every usable row of `path` through `parse(row, origin, base_dir)`; the others counted in `skips`."""
    skips = skips if skips is not None else Tally("skips")
    base_dir = Path(path).parent
    rows, first_problem = [], None
    for origin, row, problem in iter_rows(path):
        try:
            if row is None:
                raise RowRejected(origin, problem)
            rows.append(parse(row, origin, base_dir))
        except RowRejected as err:
            skips.add("row rejected", f"{err.origin}: {err.message}")
            first_problem = first_problem or f"{err.origin}: {err.message}"
    skips.flush()
    if not rows:
        raise VlmgraftError(f"no usable {what} in {str(path)!r}" + (f"; first problem: {first_problem}"
                                                                     if first_problem else " (the file is empty)"))
    return rows, skips


def read_preferences(path: str | Path, skips: Tally | None = None) -> tuple[list[dict], Tally]:
    return read_rows(path, parse_preference, skips, "preference row")


def as_dataset(rows: list[dict]):
    """A `datasets.Dataset` for TRL: one JSON column (message lists vary in shape, which Arrow columns cannot) and
    the `images` column by which TRL's trainers recognise vision data."""
    from datasets import Dataset

    return Dataset.from_dict({"row": [json.dumps(r, ensure_ascii=False) for r in rows],
                              "images": [list(r["images"]) for r in rows]})


def _missing_file(ref) -> str | None:
    if isinstance(ref, str) and not ref.startswith(("data:", "http://", "https://", "file://")) and \
            not Path(ref).is_file():
        return ref
    return None


def parse_prompt_row(row: dict, origin: str, base_dir: Path) -> dict:
    """A GRPO row → {"prompt": messages ending with the user's turn, "images": refs, "origin", **other columns}."""
    if isinstance(row.get("messages"), list):
        prompt, key = row["messages"], "messages"
    elif row.get("prompt") is not None:
        prompt, key = row["prompt"], "prompt"
    else:
        raise RowRejected(origin, f"a GRPO row needs 'messages' (ms-swift) or 'prompt' (TRL) (keys found: "
                                  f"{sorted(row)})")
    messages, refs = parse_prompt(prompt, _images_column(row, origin), origin, base_dir)
    if messages[-1]["role"] != "user":
        raise RowRejected(origin, f"'{key}' ends with a {messages[-1]['role']!r} turn; a GRPO prompt ends with the "
                                  f"user's turn (the model writes the answer)")
    missing = next((m for m in map(_missing_file, refs) if m), None)
    if missing:
        raise RowRejected(origin, f"image missing: {missing}")
    extra = {k: v for k, v in row.items() if k not in (key, "images", "image")}
    return {**extra, "prompt": messages, "images": refs, "origin": origin}


def read_prompts(path: str | Path, skips: Tally | None = None) -> tuple[list[dict], Tally]:
    rows, skips = read_rows(path, parse_prompt_row, skips, "GRPO row")
    with_images = sum(1 for r in rows if r["images"])
    if 0 < with_images < len(rows):
        example = next(r["origin"] for r in rows if not r["images"])
        raise VlmgraftError(f"{path}: {with_images} rows have images and {len(rows) - with_images} are text-only "
                            f"(e.g. {example}); TRL's GRPOTrainer cannot batch the two together (the processor "
                            f"fails on a batch where some prompts have no image). Train them as separate runs, or "
                            f"give every row an image.")
    return rows, skips
