"""Build the real-size graft (SmolVLM2-256M vision + Qwen3-0.6B text, random weights) and record audit and memory.

    python bench/bench_build.py --root /tmp/vg-real
Prints one JSON line: the audit checks, seconds, peak CPU RSS, graft parameter counts.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmgraft.fixtures.models import save_real_size_pair  # noqa: E402
from vlmgraft.graft.build import BuildOptions, build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/vg-real")
    args = parser.parse_args()
    start = time.perf_counter()
    donor, llm = save_real_size_pair(args.root)
    made = time.perf_counter() - start
    out = f"{args.root}/graft"
    report = build(BuildOptions(vision=str(donor), llm=str(llm), out=out, force=True))
    summary = json.load(open(f"{out}/graft_report.json"))
    print(json.dumps({"bench": "build", "fixtures_seconds": round(made, 1), "build_seconds": summary["seconds"],
                      "memory": summary["memory"], "parameters": summary["parameters"], "passed": report.passed,
                      "checks": {c.name: c.detail for c in report.checks}}, ensure_ascii=False))


if __name__ == "__main__":
    main()
