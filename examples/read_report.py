"""Read a stream run's score matrix and recompute its summary (OP, BWT, forgetting) by hand.

    python examples/read_report.py [RUN_DIR]      # RUN_DIR: a method's directory, e.g. runs/tiny/ogp

Without RUN_DIR it first runs recipes/tiny.yaml (one method, 4 steps a domain, seconds on a CPU) into
a temp dir. It reads matrix.json (R[t][i] per metric) and summary.json, recomputes the summary
columns with lora_cl.metrics and checks they match. This is docs/guides/report.md, runnable.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import lora_cl
from lora_cl import metrics

ROOT = Path(__file__).resolve().parents[1]


def tiny_run() -> Path:
    recipe = lora_cl.load_recipe(ROOT / "recipes" / "tiny.yaml",
                                 ["compare=[]", "training.steps_per_domain=4", "training.save_steps=4"])
    out = Path(tempfile.mkdtemp(prefix="lora-cl-report-"))
    return lora_cl.run_stream(recipe, output_dir=out, progress=False)[0]


def main() -> None:
    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else tiny_run()
    matrix = json.loads((run_dir / "matrix.json").read_text(encoding="utf-8"))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    print(f"run {run_dir}: domains {matrix['domains']}, primary metric {matrix['primary']}, "
          f"finished {summary['finished']}/{summary['T']}")
    for name, m in matrix["metrics"].items():
        R, hib, stored = m["R"], m["higher_is_better"], summary["metrics"][name]
        if stored is None:
            print(f"{name}: incomplete or non-finite matrix, no summary yet")
            continue
        print(f"\n{name} ({'higher' if hib else 'lower'} is better); R[t][i], row t: after training t")
        for row_name, row in [("base", m["base"]), *zip(matrix["domains"], R, strict=True)]:
            print(f"  {row_name:>10} " + " ".join(f"{x:9.4f}" for x in row))
        ours = {"op": metrics.op(R),
                "bwt_trace": metrics.bwt(R, convention="trace", higher_is_better=hib),
                "bwt_gem": metrics.bwt(R, convention="gem", higher_is_better=hib),
                "forgetting": metrics.forgetting(R, higher_is_better=hib),
                "fwt": metrics.fwt(R, m["base"], higher_is_better=hib)}
        for key, value in ours.items():
            agree = math.isclose(value, stored[key], rel_tol=1e-9, abs_tol=1e-12)
            print(f"  {key:<10} recomputed {value:+.6f}  summary.json {stored[key]:+.6f}  "
                  f"{'agree' if agree else 'DIFFER'}")
            assert agree, f"{name} {key}: recomputed {value} != stored {stored[key]}"
        T = len(R)
        assert math.isclose(ours["bwt_trace"], (T - 1) / T * ours["bwt_gem"], rel_tol=1e-9, abs_tol=1e-12)
    print(f"\nall summary values agree with lora_cl.metrics; the report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    main()
