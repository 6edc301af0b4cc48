"""Shared fixtures: tiny random-weight donor and LLMs generated once per test session (no hub access)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from vlmgraft.fixtures.models import save_tiny_donor, save_tiny_llm

    root = tmp_path_factory.mktemp("tiny")
    save_tiny_donor(root / "donor")
    save_tiny_llm(root / "qwen3", family="qwen3", tied=True)
    save_tiny_llm(root / "qwen3-untied", family="qwen3", tied=False)
    save_tiny_llm(root / "llama3", family="llama3", tied=False)
    return root


@pytest.fixture(scope="session")
def tiny_graft(tiny_dir):
    """A graft of the tiny donor onto the tied Qwen3-like LLM, saved as bf16 like a real build."""
    from vlmgraft.graft.build import BuildOptions, build

    out = tiny_dir / "graft-qwen3"
    build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "qwen3"), out=out), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def family_grafts(tiny_dir):
    """{"llava": a SigLIP donor, "exaone4_5": a Qwen2.5-VL donor} grafted onto the tied tiny Qwen3, in float32."""
    from vlmgraft.fixtures.encoders import save_tiny_siglip
    from vlmgraft.fixtures.qwen_vl import save_tiny_qwen25_vl
    from vlmgraft.graft.build import BuildOptions, build

    out = {}
    for name, make in (("llava", save_tiny_siglip), ("exaone4_5", save_tiny_qwen25_vl)):
        donor = make(tiny_dir / f"{name}-donor")
        out[name] = tiny_dir / f"graft-{name}"
        build(BuildOptions(vision=str(donor), llm=str(tiny_dir / "qwen3"), out=out[name], dtype="float32"),
              log=lambda *_: None)
    return out


def scramble(model, seed: int = 0) -> None:
    """Larger random weights than a fresh init, so that greedy answers depend on the prompt and differ per step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / param.shape[-1] ** 0.5))


@pytest.fixture(scope="module")
def loaded(tiny_graft):
    """The tiny graft in fp32 on the CPU, scrambled so that generation tests can tell prompts apart."""
    from vlmgraft.infer.model import load_for_inference

    model, processor = load_for_inference(tiny_graft, device="cpu", dtype="float32")
    scramble(model)
    return model, processor
