"""Where llama.cpp's own HF → GGUF converter comes from: a llama.cpp checkout or llama-cpp-python's sdist.

llama.cpp publishes only the `gguf` library on PyPI, not its converter (`convert_hf_to_gguf.py` and the `conversion`
package it imports). llama-cpp-python's source distribution vendors the whole llama.cpp tree, so
`pip download --no-deps --no-binary :all: llama-cpp-python==VERSION` is the ordinary way to get a converter that
matches the llama.cpp runtime pip installs. `--llama-cpp` accepts that tarball, its unpacked folder, a llama.cpp
checkout, or `download` (which runs that pip command for the version below).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from vlmgraft.errors import VlmgraftError

ENV = "VLMGRAFT_LLAMA_CPP"
# The llama-cpp-python release whose vendored converter the exporter was written and tested against.
PINNED_VERSION = "0.3.36"
# What the exporter imports from a llama.cpp tree (the `conversion` package is llama.cpp's converter split out of
# convert_hf_to_gguf.py; trees older than that split cannot be used).
NEEDED = ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py")
_VENDOR = "vendor/llama.cpp"


def cache_root() -> Path:
    """Unpacked converter trees live here (`XDG_CACHE_HOME`, else ~/.cache, then vlmgraft/llama.cpp)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlmgraft" / "llama.cpp"


def how_to_get() -> str:
    return (f"pass --llama-cpp with a llama.cpp checkout or llama-cpp-python's source tarball (get it with "
            f"`pip download --no-deps --no-binary :all: llama-cpp-python=={PINNED_VERSION}`), set {ENV} to one, "
            f"or pass --llama-cpp download to let vlmgraft run that pip command")


def _is_tree(folder: Path) -> bool:
    return all((folder / name).is_file() for name in NEEDED)


def _tree_in_folder(folder: Path) -> Path:
    for candidate in (folder, folder / _VENDOR):
        if _is_tree(candidate):
            return candidate
    missing = [name for name in NEEDED if not (folder / name).is_file() and not (folder / _VENDOR / name).is_file()]
    raise VlmgraftError(f"{str(folder)!r} is not a llama.cpp tree with its converter (missing: {', '.join(missing)}); "
                        f"llama.cpp older than its `conversion/` package split is not supported; {how_to_get()}")


def _unpack(tarball: Path) -> Path:
    """Extract just the converter, its `conversion` package and `gguf-py` from an sdist (once, into the cache)."""
    stem = tarball.name.removesuffix(".tar.gz").removesuffix(".tgz")
    dest = cache_root() / stem
    if _is_tree(dest):
        return dest
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    try:
        with tarfile.open(tarball) as archive:
            members = []
            for member in archive.getmembers():
                # "<project>-<version>/vendor/llama.cpp/<path>" → "<path>"
                top, _, rest = member.name.partition("/")
                inner = rest.removeprefix(_VENDOR + "/") if rest.startswith(_VENDOR + "/") else None
                if (inner and inner.startswith(wanted) and ".." not in Path(inner).parts
                        and (member.isfile() or member.isdir())):
                    member.name = inner
                    members.append(member)
            if not members:
                raise VlmgraftError(f"{str(tarball)!r} holds no {_VENDOR}/convert_hf_to_gguf.py; {how_to_get()}")
            dest.mkdir(parents=True, exist_ok=True)
            # The "data" filter (Python >= 3.10.12) also refuses links and absolute paths; older Pythons lack it.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(dest, members=members, **safe)
    except (tarfile.TarError, OSError) as err:
        raise VlmgraftError(f"cannot unpack {str(tarball)!r}: {err}") from err
    return _tree_in_folder(dest)


def _download() -> Path:
    target = cache_root() / "sdist"
    tarball = target / f"llama_cpp_python-{PINNED_VERSION}.tar.gz"
    if not tarball.is_file():
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(target),
               f"llama-cpp-python=={PINNED_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not tarball.is_file():
            raise VlmgraftError(f"`{' '.join(cmd[2:])}` failed: {done.stderr.strip()[-800:]}")
    return _unpack(tarball)


def converter_tree(spec: str | os.PathLike | None = None) -> Path:
    """The llama.cpp folder holding `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/` that `spec` names."""
    spec = spec if spec is not None else os.environ.get(ENV)
    if not spec:
        raise VlmgraftError(f"vlmgraft export gguf needs llama.cpp's converter source: {how_to_get()}")
    if str(spec) == "download":
        return _download()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _tree_in_folder(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        return _unpack(path)
    raise VlmgraftError(f"--llama-cpp {str(spec)!r} is neither a folder nor a .tar.gz source distribution; "
                        f"{how_to_get()}")
