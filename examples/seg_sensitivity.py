"""How often the family-wise SEG rules flag the tumours of a cached ``klip-med eval`` run, per null model.

For each model (a ``klip-med calibrate`` file) and the run's tumour slices: the fraction of tumour
slices with any block at or above the ``fwer-slice:ALPHA`` threshold, the fraction with such a block
on the tumour, and the fraction of patients whose tumour slices, taken together as one volume, get
any block at or above the ``fwer:ALPHA`` (volume) threshold. The sensitivity side of the calibration
tables (which give the healthy side) in BENCHMARKS.md.

    python examples/seg_sensitivity.py runs/mri4x_test OLD.json NEW.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from klip_med.calibration.null_model import NullModel
from klip_med.eval.cache import run_slices
from klip_med.eval.metrics import lesion_blocks
from klip_med.eval.nulls import cached_blocks


def sensitivity(model: NullModel, entries, alpha: float) -> dict[str, float]:
    size = int(model.conditions["block_size"])
    windows = [w["name"] for w in model.conditions["windows"]]
    slices, on_lesion, volumes = [], [], {}
    for e in (e for e in entries if e.label == 1):
        densities, covariates, inside = cached_blocks(e, windows, size)
        z = model.z_scores(densities, covariates, inside)
        n = int(inside.sum())
        flag = (z >= model.family_threshold(alpha, n)) & inside
        lesion = lesion_blocks(e.lesion, size)
        slices.append(flag.any())
        on_lesion.append((flag & lesion).any())
        volumes.setdefault(e.patient, []).append((z[inside], n))
    flagged = [(np.concatenate([z for z, _ in v]) >= model.family_threshold(alpha, sum(n for _, n in v), volume=True)).any()
               for v in volumes.values()]
    return {"tumour slices": float(np.mean(slices)), "with a flag on the tumour": float(np.mean(on_lesion)),
            "tumour volumes": float(np.mean(flagged)), "patients": len(flagged), "slices": len(slices)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args(argv)
    entries = run_slices(args.run)
    print(f"| model | c | tumour slices flagged, fwer-slice:{args.alpha:g} | ... with a flag on the tumour | "
          f"tumour volumes flagged, fwer:{args.alpha:g} |")
    print("|---|---|---|---|---|")
    for path in args.models:
        model = NullModel.load(path)
        s = sensitivity(model, entries, args.alpha)
        print(f"| {path.name} | {model.effective_fraction:.3f} | {s['tumour slices']:.3f} ({s['slices']}) | "
              f"{s['with a flag on the tumour']:.3f} | {s['tumour volumes']:.3f} ({s['patients']}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
