"""The offline demo, shortened: grafting + connector-only alignment makes a model answer from the image."""

from __future__ import annotations

import json

from vlmgraft.demo import run_demo


def test_quick_demo_learns_to_see_and_resumes(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(out, quick=True)
    assert results["accuracy_before"] <= 0.45  # near chance (0.25) before the connector is trained
    assert results["accuracy_after"] >= 0.9
    assert results["accuracy_ablated"] <= 0.5  # with noise instead of images it falls back towards chance
    saved = json.loads((out / "demo_results.json").read_text())
    assert saved["accuracy_after"] == results["accuracy_after"]
    for name in ("answers.png", "detect.png", "qwen3-smvl-demo/config.json", "graft/graft_report.json"):
        assert (out / name).exists(), name

    again = run_demo(out, quick=True)  # every step is found done: nothing is retrained
    assert again["accuracy_after"] == results["accuracy_after"]
    assert json.loads((out / "demo_state.json").read_text())["seconds"] == saved["step_seconds"]
