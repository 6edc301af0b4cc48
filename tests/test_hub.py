"""Model loading through `vlmgraft.hub`: hub kernels stay off unless the user opts in."""

from __future__ import annotations

from vlmgraft import hub


def test_models_load_without_hub_kernels_unless_asked(tiny_graft, monkeypatch):
    from vlmgraft.infer.model import load_for_inference

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model, _ = load_for_inference(tiny_graft, device="cpu", dtype="float32")
    assert model.use_kernels is False  # transformers' own default turns them on where `kernels` is installed
    seen = {}
    hub.load_model(lambda name, **kwargs: seen.update(kwargs), tiny_graft, "model")
    assert seen == {"use_kernels": False}
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    seen.clear()
    hub.load_model(lambda name, **kwargs: seen.update(kwargs), tiny_graft, "model")
    assert seen == {}


def test_training_loads_without_hub_kernels(tiny_graft, monkeypatch):
    from vlmgraft.train.config import TrainConfig
    from vlmgraft.train.run import load_model

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model, _ = load_model(TrainConfig(model=str(tiny_graft), data="unused", output_dir="unused"))
    assert model.use_kernels is False
