"""The dtype a graft is saved in: every config.json level names it, and the build says when sources lose precision."""

from __future__ import annotations

import json

import pytest

from vlmgraft.graft.build import BuildOptions, build


def _config_dtypes(config: dict, where: str = "config") -> dict[str, str]:
    """The dtype named at every level of a saved config.json (top level and nested *_config dicts)."""
    found = {where: config.get("dtype")}
    for key, value in config.items():
        if isinstance(value, dict) and "model_type" in value:
            found.update(_config_dtypes(value, f"{where}.{key}"))
    return found


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_config_level_names_the_saved_dtype(tiny_dir, tmp_path, dtype):
    lines: list[str] = []
    build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "qwen3"), out=tmp_path / "g", dtype=dtype),
          log=lines.append)
    dtypes = _config_dtypes(json.loads((tmp_path / "g" / "config.json").read_text()))
    assert {"config.text_config", "config.vision_config"} <= set(dtypes)
    assert set(dtypes.values()) == {dtype}, dtypes
    downcasts = [line for line in lines if "down-cast" in line]
    if dtype == "bfloat16":  # the tiny sources are stored in float32
        assert len(downcasts) == 1
        assert "vision donor float32" in downcasts[0] and "LLM float32" in downcasts[0]
        assert "--dtype float32" in downcasts[0]
    else:
        assert not downcasts
    report = json.loads((tmp_path / "g" / "graft_report.json").read_text())
    assert report["source_dtypes"] == {"vision donor": "float32", "LLM": "float32"}
