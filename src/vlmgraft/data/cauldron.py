"""The Cauldron layout (HuggingFaceM4/the_cauldron): rows of `images` + `texts: [{user, assistant, source}]`.

`images` is a list of `{"bytes", "path"}` structs (how `datasets` stores Image features in parquet/arrow) or of raw
bytes; a single `image` column is accepted too. Every image goes before the first question, as in the Cauldron's
own training recipe; `images="first"` keeps only the first image of each row.

Where rows come from:
- parquet files or a folder of them (one subset per sub-folder, or per file when the folder holds files directly);
  read into memory with pyarrow for random access, or streamed row group by row group;
- a `datasets.save_to_disk` folder: its Arrow files are memory-mapped, so rows cost no RAM until read;
- a hub id (e.g. `HuggingFaceM4/the_cauldron` with `subsets`), through `datasets.load_dataset`, only when online.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlmgraft.data.images import DEFAULT_POLICY, ImagePolicy
from vlmgraft.data.sample import Sample
from vlmgraft.data.source import RowRejected, Source, check_conversation, decode_images
from vlmgraft.errors import VlmgraftError

COLUMNS_NEEDED = "a 'texts' column and an 'images' (or 'image') column"


def _row_messages(row: dict, image_mode: str, origin: str) -> tuple[list[dict], list]:
    texts = row.get("texts")
    if not isinstance(texts, list) or not texts:
        raise RowRejected(origin, "field 'texts' must be a non-empty list of {user, assistant}")
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    images = [im for im in (images or []) if im is not None]
    if image_mode == "first":
        images = images[:1]
    messages = []
    for turn, entry in enumerate(texts):
        if not isinstance(entry, dict) or not isinstance(entry.get("user"), str) \
                or not isinstance(entry.get("assistant"), str):
            raise RowRejected(origin, f"texts[{turn}] needs string 'user' and 'assistant'")
        parts = [{"type": "image"} for _ in images] if turn == 0 else []
        parts.append({"type": "text", "text": entry["user"]})
        messages.append({"role": "user", "content": parts})
        messages.append({"role": "assistant", "content": entry["assistant"]})
    check_conversation(messages, len(images), origin)
    return messages, images


class _TableSource(Source):
    """Rows of an Arrow table (loaded lazily per process) decoded as Cauldron rows."""

    format = "cauldron"

    def __init__(self, path, name: str, policy: ImagePolicy, image_mode: str, streaming: bool):
        super().__init__(path, name, policy)
        if image_mode not in ("all", "first"):
            raise VlmgraftError(f"images={image_mode!r} for {path}: expected 'all' or 'first'")
        self.image_mode, self.streaming = image_mode, streaming
        self._table = None
        self._keep: np.ndarray | None = None  # rows that passed validation (map-style only)

    def _load_table(self):
        raise NotImplementedError

    def _row_origin(self, row: int) -> str:
        return f"{self.path}[{row}]"

    def _row_dir(self, row: int) -> Path | None:
        """The folder a row's relative `{"path": ...}` images are stored next to (None: no folder of its own)."""
        return None

    def _validate(self) -> None:
        table = self.table
        columns = set(table.column_names)
        if "texts" not in columns or not columns & {"images", "image"}:
            raise VlmgraftError(f"{self.path} is not in the Cauldron layout: it needs {COLUMNS_NEEDED}; "
                                f"columns found: {sorted(columns)}")
        keep = []
        for row, texts in enumerate(table.column("texts").to_pylist()):
            try:
                _row_messages({"texts": texts, "images": []}, "all", self._row_origin(row))
            except RowRejected as err:
                self.problems.append(err)
                continue
            keep.append(row)
        self._keep = np.asarray(keep, dtype=np.int64)

    @property
    def table(self):
        if self._table is None:
            self._table = self._load_table()
        return self._table

    def __len__(self) -> int:
        if self._keep is None:
            self._validate()
        return len(self._keep)

    def origin(self, index: int) -> str:
        return self._row_origin(int(self._keep[index])) if self._keep is not None else self._row_origin(index)

    def raw(self, index: int) -> dict:
        if self._keep is None:
            self._validate()
        row = int(self._keep[index])
        return {"row": row, "data": self.table.slice(row, 1).to_pylist()[0]}

    def iter_raw(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, dict]]:
        for index in range(shard, len(self), num_shards):
            yield index, self.raw(index)

    def to_sample(self, index: int, raw: dict) -> Sample:
        origin = self._row_origin(raw["row"])
        messages, refs = _row_messages(raw["data"], self.image_mode, origin)
        images = decode_images(refs, self._row_dir(raw["row"]), self.policy, origin)
        return Sample(messages=messages, images=images, source=self.name, origin=origin)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_table"] = None  # re-read in a spawned worker rather than pickling every image byte
        return state


class ParquetSource(_TableSource):
    """One subset made of one or more parquet files."""

    def __init__(self, files: list[Path], name: str, policy: ImagePolicy = DEFAULT_POLICY, image_mode: str = "all",
                 streaming: bool = False):
        super().__init__(files[0] if len(files) == 1 else files[0].parent, name, policy, image_mode, streaming)
        self.files = [str(f) for f in files]
        import pyarrow.parquet as pq

        self._rows_per_file = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
        self._starts = np.cumsum([0, *self._rows_per_file])
        if streaming:
            self._check_schema(pq.ParquetFile(self.files[0]).schema_arrow.names)

    def _check_schema(self, names) -> None:
        if "texts" not in names or not {"images", "image"} & set(names):
            raise VlmgraftError(f"{self.files[0]} is not in the Cauldron layout: it needs {COLUMNS_NEEDED}; "
                                f"columns found: {sorted(names)}")

    def _load_table(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(f) for f in self.files]
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def _file_of(self, row: int) -> int:
        return int(np.searchsorted(self._starts, row, side="right") - 1)

    def _row_origin(self, row: int) -> str:
        file = self._file_of(row)
        return f"{self.files[file]}[{row - int(self._starts[file])}]"

    def _row_dir(self, row: int) -> Path:
        return Path(self.files[self._file_of(row)]).parent

    def __len__(self) -> int:
        if self.streaming:
            return int(self._starts[-1])
        return super().__len__()

    def iter_raw(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, dict]]:
        if not self.streaming:
            yield from super().iter_raw(shard, num_shards)
            return
        import pyarrow.parquet as pq

        group = 0  # row groups are dealt round-robin to shards, so each worker reads only its own bytes
        for file, start in zip(self.files, self._starts[:-1], strict=True):
            handle = pq.ParquetFile(file)
            offset = int(start)
            for rg in range(handle.num_row_groups):
                rows = handle.metadata.row_group(rg).num_rows
                if group % num_shards == shard:
                    for i, data in enumerate(handle.read_row_group(rg).to_pylist()):
                        yield offset + i, {"row": offset + i, "data": data}
                group += 1
                offset += rows


class ArrowFolderSource(_TableSource):
    """A `datasets.save_to_disk` folder, read with pyarrow alone (memory-mapped, no `datasets` import needed)."""

    def __init__(self, folder: Path, name: str, policy: ImagePolicy = DEFAULT_POLICY, image_mode: str = "all",
                 streaming: bool = False):
        super().__init__(folder, name, policy, image_mode, streaming)
        self.files = sorted(str(f) for f in Path(folder).glob("*.arrow"))
        if not self.files:
            raise VlmgraftError(f"{folder} looks like a `datasets` folder but holds no .arrow files")

    def _row_dir(self, row: int) -> Path:
        return Path(self.path)

    def _load_table(self):
        import pyarrow as pa

        tables = [pa.ipc.open_stream(pa.memory_map(f)).read_all() for f in self.files]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


class HubSource(_TableSource):
    """A hub data set split loaded with `datasets.load_dataset` (online, or from the local datasets cache)."""

    def __init__(self, repo: str, subset: str | None, split: str = "train", policy: ImagePolicy = DEFAULT_POLICY,
                 image_mode: str = "all", streaming: bool = False):
        super().__init__(f"{repo}/{subset}" if subset else repo, subset or repo.split("/")[-1], policy, image_mode,
                         False)
        self.repo, self.subset, self.split = repo, subset, split
        self.table  # noqa: B018 - load now, so an offline machine fails here with a clear message

    def _load_table(self):
        try:
            import datasets
        except ImportError as err:
            raise VlmgraftError(f"reading the hub data set {self.repo!r} needs the `datasets` package") from err
        from huggingface_hub import constants

        from vlmgraft.hub import hub_reachable

        if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1" or not hub_reachable():
            offline_hint = ("the Hugging Face hub is unreachable (offline). Download it where the hub is reachable "
                            f"(`hf download {self.repo} --repo-type dataset --local-dir DIR`) and pass DIR, or a "
                            "folder of its parquet files, instead")
        else:
            offline_hint = ""
        try:
            ds = datasets.load_dataset(self.repo, self.subset, split=self.split)
        except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError ...)
            reason = offline_hint or str(err).splitlines()[0]
            raise VlmgraftError(f"could not load data set {self.repo!r}"
                                + (f" subset {self.subset!r}" if self.subset else "") + f": {reason}") from err
        return ds.data.table


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.parquet") if p.is_file())


def _is_arrow_folder(folder: Path) -> bool:
    return (folder / "state.json").is_file() and any(folder.glob("*.arrow"))


def cauldron_sources(path: str | Path, *, subsets: list[str] | None = None, image_mode: str = "all",
                     policy: ImagePolicy = DEFAULT_POLICY, streaming: bool = False, split: str = "train",
                     name: str | None = None) -> list[_TableSource]:
    """One Source per subset found at `path` (a parquet file, a folder, a saved `datasets` folder or a hub id)."""
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix != ".parquet":
            raise VlmgraftError(f"{local} is not a parquet file; the Cauldron layout is read from parquet or arrow")
        return [ParquetSource([local], name or local.stem, policy, image_mode, streaming)]
    if local.is_dir():
        groups = _subset_groups(local)
        if subsets:
            missing = [s for s in subsets if s not in groups]
            if missing:
                raise VlmgraftError(f"subset(s) {missing} not found in {local}; available: {sorted(groups)}")
            groups = {s: groups[s] for s in subsets}
        sources = []
        for subset, where in groups.items():
            label = name if name and len(groups) == 1 else subset
            if isinstance(where, Path):
                sources.append(ArrowFolderSource(where, label, policy, image_mode, streaming))
            else:
                sources.append(ParquetSource(where, label, policy, image_mode, streaming))
        return sources
    if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise VlmgraftError(f"data path {str(path)!r} does not exist")
    return [HubSource(str(path), subset, split, policy, image_mode, streaming) for subset in (subsets or [None])]


def _subset_groups(folder: Path) -> dict[str, list[Path] | Path]:
    """subset name → its parquet files, or → an arrow folder. Sub-folders are subsets; loose files one subset."""
    if _is_arrow_folder(folder):
        return {folder.name: folder}
    groups: dict[str, list[Path] | Path] = {}
    loose = sorted(p for p in folder.glob("*.parquet") if p.is_file())
    if loose:
        groups[folder.name] = loose
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        if _is_arrow_folder(child):
            groups[child.name] = child
        elif files := _parquet_files(child):
            groups[child.name] = files
        elif (child / "train").is_dir() and _is_arrow_folder(child / "train"):
            groups[child.name] = child / "train"
    if not groups and (folder / "train").is_dir() and _is_arrow_folder(folder / "train"):
        groups[folder.name] = folder / "train"  # a DatasetDict saved with save_to_disk
    if not groups:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".jsonl", ".json"))[:3]
        hint = f"; it holds {', '.join(others)}: pass that file as the SPEC" if others else ""
        raise VlmgraftError(f"no parquet or arrow data found in {folder}{hint}")
    return groups
