"""Inference: load a model, generate in batches, chat, detect boxes, serve an OpenAI-compatible API.

`load_for_inference(model_dir)` → (model, processor); `generate(model, processor, conversations, images, ...)` →
list of `GenerationResult` (answer `.text`, `.reasoning`, token counts). Names load lazily so that importing the CLI
stays fast.
"""

from __future__ import annotations

_EXPORTS = {
    "load_for_inference": "vlmgraft.infer.model",
    "generate": "vlmgraft.infer.generate",
    "GenerationResult": "vlmgraft.infer.generate",
    "SamplingParams": "vlmgraft.infer.sampling",
    "Engine": "vlmgraft.infer.engine",
    "EngineConfig": "vlmgraft.infer.engine",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlmgraft.infer' has no attribute {name!r}")
