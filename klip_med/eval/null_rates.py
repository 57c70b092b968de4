"""How often healthy images of a benchmark are flagged, at the three levels a reviewer meets.

For the lesion-free images of a run, each scored by a null model that was *not* fitted on it (a
model file fitted on other patients, or leave-one-patient-out), the observed rates are:

- ``rates``: per block, the fraction of in-body blocks with ``z >= z_threshold(a)`` at nominal
  ``a`` = 1% and 5% (``--threshold fpr:a``);
- ``slice``: per slice, the fraction of healthy slices with any flag under ``fwer-slice:0.05`` and
  under ``fdr-slice:0.05``, and with ``slice_p <= 0.05``;
- ``volume``: per patient, the fraction of patients whose lesion-free slices of this run, taken
  together as one (short) volume, get any flag under ``fwer:0.05`` (what ``klip-med run`` writes
  into the SEG by default).

Each comes with a per-patient bootstrap interval (eval.metrics.patient_bootstrap), or, with fewer than
:data:`~klip_med.eval.metrics.MIN_INTERVAL_UNITS` patients, none and each patient's own rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from klip_med.calibration.levels import benjamini_hochberg
from klip_med.eval.cache import CachedSlice
from klip_med.eval.metrics import interval_rule, patient_bootstrap, per_unit

BLOCK_RATES = (0.01, 0.05)
FAMILY_RATE = 0.05


def _scored(ids: Sequence[CachedSlice], models: Mapping[str, object], blocks: Mapping[str, tuple]) -> list[dict]:
    out = []
    for e in ids:
        model = models[e.key]
        densities, covariates, inside = blocks[e.key]
        z = model.z_scores(densities, covariates, inside)[inside]
        out.append({"key": e.key, "patient": e.patient, "model": model, "z": z, "n": int(inside.sum())})
    return out


def observed_rate(values: np.ndarray, patients: list[str], n_boot: int, seed: int, weights: np.ndarray | None = None) -> dict:
    """The (weighted) mean of ``values`` (0/1 flags) with its per-patient bootstrap interval, or with too
    few patients no interval and each patient's own rate (``per_patient``)."""
    values = np.asarray(values, dtype=np.float64)
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)

    def stat(idx: np.ndarray) -> float:
        return float((values[idx] * w[idx]).sum() / max(w[idx].sum(), 1e-12))

    observed = stat(np.arange(values.size))
    reason = interval_rule(patients)
    if reason is not None:  # too few patients for an interval that means something: each one's rate
        return {"observed": observed, "ci": [None, None], "n": int(values.size), "interval": reason,
                "per_patient": per_unit(stat, patients)}
    ci = patient_bootstrap(stat, patients, n_boot, seed)
    return {"observed": observed, "ci": ci.as_list(), "n": int(values.size), "interval": None}


def calibration_rates(ids: Sequence[CachedSlice], models: Mapping[str, object], blocks: Mapping[str, tuple],
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """Observed rates of the lesion-free images ``ids`` (see the module docstring).

    Args:
        models: each image's null model (key -> model), one that was not fitted on it.
        blocks: each image's ``(densities, covariates, inside)`` (eval.nulls.cached_blocks).
    """
    if not ids:
        return {"n_images": 0}
    scored = _scored(ids, models, blocks)
    patients = [s["patient"] for s in scored]
    counts = np.array([s["n"] for s in scored], dtype=np.float64)
    out: dict = {"n_images": len(scored), "n_blocks": int(counts.sum()), "n_patients": len(set(patients))}
    out["rates"] = {}
    for a in BLOCK_RATES:
        hits = np.array([float((s["z"] >= s["model"].z_threshold(a)).sum()) for s in scored])
        rate = observed_rate(hits / np.maximum(counts, 1), patients, n_boot, seed, weights=counts)
        out["rates"][f"{a:g}"] = {**rate, "nominal": a, "unit": "block"}
    fwer = np.array([float(s["n"] > 0 and (s["z"] >= s["model"].family_threshold(FAMILY_RATE, s["n"])).any())
                     for s in scored])
    per_block = np.array([float((s["z"] >= s["model"].z_threshold(0.01)).any()) for s in scored])
    fdr = np.array([float(benjamini_hochberg(s["model"].p_values(s["z"]), FAMILY_RATE).any()) for s in scored])
    slice_p = np.array([float(s["model"].family_p(s["z"].max(), s["n"])) if s["n"] else 1.0 for s in scored])
    out["slice"] = {
        f"fwer-slice:{FAMILY_RATE:g}": {**observed_rate(fwer, patients, n_boot, seed), "nominal": FAMILY_RATE,
                                        "unit": "slice with any flag"},
        f"fdr-slice:{FAMILY_RATE:g}": {**observed_rate(fdr, patients, n_boot, seed), "nominal": FAMILY_RATE,
                                       "unit": "slice with any flag (a healthy slice has only false discoveries)"},
        f"slice_p<={FAMILY_RATE:g}": {**observed_rate((slice_p <= FAMILY_RATE).astype(float), patients, n_boot, seed),
                                      "nominal": FAMILY_RATE, "unit": "slice"},
        "fpr:0.01": {**observed_rate(per_block, patients, n_boot, seed), "nominal": None,
                     "unit": "slice with any flag under the per-block rule (the first round's default SEG rule)"},
    }
    volumes, sizes = [], []
    for p in sorted(set(patients)):
        mine = [s for s in scored if s["patient"] == p]
        z = np.concatenate([s["z"] for s in mine])
        n = int(sum(s["n"] for s in mine))
        volumes.append(float(n > 0 and (z >= mine[0]["model"].family_threshold(FAMILY_RATE, n, volume=True)).any()))
        sizes.append(len(mine))
    out["volume"] = {f"fwer:{FAMILY_RATE:g}": {
        **observed_rate(np.array(volumes), sorted(set(patients)), n_boot, seed), "nominal": FAMILY_RATE,
        "unit": "patient with any flag", "slices_per_volume": [int(min(sizes)), int(max(sizes))],
        "note": "a volume is the patient's lesion-free slices of this run (not contiguous)"}}
    return out
