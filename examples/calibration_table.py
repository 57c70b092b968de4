"""The calibration table of BENCHMARKS.md: how often healthy images of patients a null model never saw
get flagged, per block, per slice and per volume, and what the calibrated map costs in localisation.

Each row applies one null model to the cached lesion-free slices of a ``klip-med eval`` run (no new
sampling): a model file (e.g. fitted on the dev split, applied to the test split), or ``lopo`` (each
patient against the other patients of the same run; ``lopo-legacy`` with the first round's spread,
``lopo-centred`` with each slice's own level removed, klip_med.calibration.centring).
Rates come with per-patient bootstrap intervals (klip_med.eval.null_rates); the localisation AUROC
is that of the calibrated map on the run's OOD images.

    python examples/calibration_table.py \\
        "MRI 4x, fit dev -> test" runs/null_mri4x_dev.json runs/mri4x_test \\
        "MRI 4x, lopo on test" lopo runs/mri4x_test
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from klip_med.calibration.null_model import NullModel
from klip_med.eval.cache import run_slices
from klip_med.eval.null_rates import calibration_rates
from klip_med.eval.nulls import add_null_maps, method_name, null_models
from klip_med.eval.summary import summarise
from klip_med.pipeline.settings import CALIBRATED_WINDOWS


def _cell(rate: dict) -> str:
    ci, units = rate["ci"], rate.get("per_patient")
    if ci[0] is None and units:  # too few patients for an interval: each one's value
        return f"{rate['observed']:.3f} (per unit " + " / ".join(f"{v:.3f}" for v in units.values()) + ")"
    return f"{rate['observed']:.3f}" + ("" if ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


LOPO = ("lopo", "lopo-legacy", "lopo-centred")


def institution(patient: str) -> str:
    """The contributing site of a TCGA patient id (``TCGA_CS_6186`` -> ``TCGA_CS``)."""
    return "_".join(patient.split("_")[:2])


def row(label: str, model_spec: str, run: Path, block_size: int, n_boot: int, group_by: str = "patient") -> str:
    entries = run_slices(run)
    if group_by == "institution":  # leave one site out, and sites as the bootstrap units
        entries = [replace(e, patient=institution(e.patient)) for e in entries]
    windows = list(CALIBRATED_WINDOWS)
    if model_spec in LOPO:
        model = "lopo"
    else:
        model = NullModel.load(model_spec)
        windows = [w["name"] for w in model.conditions["windows"]]
    spread = "legacy" if model_spec == "lopo-legacy" else "predictive"  # the first round's estimator, or ours
    centring = "slice" if model_spec == "lopo-centred" else "none"
    models, blocks = null_models(entries, model, windows, block_size, spread=spread, centring=centring)
    ids = [e for e in entries if e.label == 0]
    cal = calibration_rates(ids, models, blocks, n_boot=n_boot, seed=0)
    methods, _ = summarise(add_null_maps(entries, models, blocks, windows, block_size), block_size, 5, n_boot, 0)
    loc = methods[method_name(windows)]["localisation"]
    auroc = _cell({"observed": loc["auroc"], "ci": loc["auroc_ci"]}) if loc and loc["auroc"] is not None else "n/a"
    s = cal["slice"]
    return (f"| {label} | {cal['n_images']} / {cal['n_patients']} | {_cell(cal['rates']['0.01'])} | "
            f"{_cell(cal['rates']['0.05'])} | {_cell(s['fwer-slice:0.05'])} | {_cell(s['fdr-slice:0.05'])} | "
            f"{_cell(s['fpr:0.01'])} | {_cell(cal['volume']['fwer:0.05'])} | {auroc} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", help="triples: LABEL MODEL(.json|lopo|lopo-legacy|lopo-centred) EVAL_RUN_DIR")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--group-by", choices=("patient", "institution"), default="patient",
                        help="the unit lopo leaves out and the bootstrap resamples: the patient, or the TCGA "
                             "contributing site (a dev-only check of how a model transfers to another site)")
    args = parser.parse_args(argv)
    if len(args.rows) % 3:
        parser.error("rows come in triples: LABEL MODEL RUN")
    print("| null model, applied to | healthy images / patients | block rate at 1% | block rate at 5% | slices "
          "flagged, fwer-slice:0.05 | slices flagged, fdr-slice:0.05 | slices flagged, fpr:0.01 (old rule) | "
          "volumes flagged, fwer:0.05 | localisation AUROC of the calibrated map |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in range(0, len(args.rows), 3):
        label, spec, run = args.rows[k : k + 3]
        print(row(label, spec, Path(run), args.block_size, args.bootstrap, args.group_by), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
