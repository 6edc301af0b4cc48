"""Loading hub ids or local folders with one clear sentence when that fails (offline, typo, gated repo)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from vlmgraft.errors import VlmgraftError

T = TypeVar("T")


def is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).expanduser().is_dir()


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine fails at once instead of after minutes of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_error(name: str, role: str) -> VlmgraftError:
    return VlmgraftError(
        f"Could not load the {role} {name!r}: it is not a local folder and the Hugging Face hub is unreachable "
        f"(offline) or has no such repo. Download it where the hub is reachable "
        f"(`hf download {name} --local-dir ./{name.rstrip('/').split('/')[-1]}`) and pass that folder instead.")


def load(loader: Callable[..., T], name_or_path: str | os.PathLike, role: str, **kwargs) -> T:
    """Call `loader(name_or_path, **kwargs)`; turn hub/network/missing-file failures into a VlmgraftError."""
    name = str(name_or_path)
    if is_local(name):
        try:
            return loader(os.path.expanduser(name), **kwargs)
        except (OSError, ValueError) as err:
            raise VlmgraftError(f"Could not load the {role} from folder {name!r}: {err}") from err
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise VlmgraftError(f"{role} folder {name!r} does not exist.")
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        # Cache-only from here on: every later lookup fails at once instead of retrying for minutes.
        constants.HF_HUB_OFFLINE = True
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError, ConnectionError) as err:
        if constants.HF_HUB_OFFLINE:
            raise _offline_error(name, role) from err
        raise VlmgraftError(f"Could not load the {role} {name!r} from the Hugging Face hub: {err}") from err


def load_model(loader: Callable[..., T], name_or_path: str | os.PathLike, role: str, **kwargs) -> T:
    """`load` for model weights, with transformers' hub-kernel substitution off unless the user asks for it.

    Where the `kernels` package is installed (transformers depends on it), `from_pretrained` swaps layers for
    kernels it downloads from the hub: offline, the first `model.train()` on CUDA then fails, and online a run
    silently executes code the graft was never checked with. `USE_HUB_KERNELS=1` opts back in.
    """
    if os.environ.get("USE_HUB_KERNELS") is None:
        kwargs.setdefault("use_kernels", False)
    return load(loader, name_or_path, role, **kwargs)

