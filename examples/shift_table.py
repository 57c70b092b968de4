"""One BENCHMARKS.md table per shift kind (issue 20): every method of a dev run and its test run, read
from their ``results.json`` (no computation).

    python examples/shift_table.py "MRI 4x, hypointense" runs/mri4x_dev_hypo runs/mri4x_test_hypo

Columns: localisation AUROC on dev and test with per-patient bootstrap intervals, the paired
difference to brightness on test, dataset-level AUROC on dev and test, network forwards and seconds per
image (the sampling run's, shared by every row that uses it, plus the row's own; test run, one loaded core).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from klip_med.eval.results import localisation_delta, with_ci

ROWS = ("klip_z", "klip[t:0.1,1]", "klip_paper[full]", "klip_paper[t:0.1,1]", "posterior_std", "residual",
        "anoddpm", "eigenscore", "cfs", "dlsr", "diffguard", "monai_likelihood", "brightness", "brightness_dev",
        "centrality")


def _methods(run: Path) -> tuple[dict, str, dict]:
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    return results["methods"], results.get("default_method", ""), results["counts"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("label")
    parser.add_argument("dev", type=Path)
    parser.add_argument("test", type=Path)
    args = parser.parse_args(argv)
    (dev, dev_default, dev_counts), (test, test_default, test_counts) = _methods(args.dev), _methods(args.test)
    print(f"**{args.label}** (dev: {dev_counts}; test: {test_counts})\n")
    print("| method | loc. AUROC, dev | loc. AUROC, test | minus brightness, test | dataset AUROC, dev | "
          "dataset AUROC, test | network forwards / image | seconds / image |")
    print("|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        name_dev = dev_default if row == "klip_z" else row
        name_test = test_default if row == "klip_z" else row
        if name_dev not in dev and name_test not in test:
            continue
        d, t = dev.get(name_dev, {}), test.get(name_test, {})
        cost = (t or d).get("cost", {})
        nfe = cost.get("nfe_per_image", 0) + cost.get("extra_nfe_per_image", 0)
        seconds = cost.get("seconds_per_image", 0.0) + cost.get("extra_seconds_per_image", 0.0)
        label = "**KLIP default** (`klip_z`, 9 windows)" if row == "klip_z" else row
        print(f"| {label} | {with_ci(d.get('localisation') or {}, 'auroc')} | "
              f"{with_ci(t.get('localisation') or {}, 'auroc')} | "
              f"{localisation_delta(t, 'brightness')} | "
              f"{with_ci(d.get('dataset') or {}, 'auroc')} | {with_ci(t.get('dataset') or {}, 'auroc')} | {nfe} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
