"""Fit a :class:`~klip_med.calibration.null_model.NullModel` on healthy block maps (no OOD data).

Steps, all on in-distribution images only:

1. log block densities of every window, in-body blocks only;
2. the comparison family (``auto``: the candidate whose held-out log-likelihood of healthy blocks is
   highest, leaving one group, i.e. patient, out at a time);
3. each family's per-unit mean and predictive spread (:mod:`klip_med.calibration.families`);
4. the reference: every healthy block's combined z-score computed with its own group left out
   (so it holds the spread between patients that a new patient brings), and the scale that makes
   the Stouffer sum over windows a z-score again;
5. the slice level: each healthy slice's largest z-score, its block p-value against the other
   groups' reference, and from those the effective number of independent tests per block
   at the family-wise level of the default SEG rule (:func:`klip_med.calibration.levels.tail_effective_fraction`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from klip_med.calibration.centring import CENTRINGS, DEFAULT_CENTRING, level_free
from klip_med.calibration.families import (
    AUTO_FAMILIES,
    CONDITIONING,
    SPREADS,
    fit_family,
    heldout_scores,
    log_density,
)
from klip_med.calibration.levels import FIT_LEVEL, family_p, fit_effective_fraction, tail_effective_fraction
from klip_med.calibration.null_model import MIN_BLOCKS, NullModel
from klip_med.calibration.tails import MIN_EXCEEDANCES, Tail
from klip_med.errors import expect


def _inputs(densities, covariates, insides) -> tuple[np.ndarray, np.ndarray]:
    n = len(densities)
    expect(n == len(covariates) == len(insides) and n >= 2, "null calibration",
           "the same number (>= 2) of density, covariate and inside maps",
           f"{len(densities)}, {len(covariates)}, {len(insides)}")
    dens = [np.asarray(d)[None] if np.ndim(d) == 2 else np.asarray(d) for d in densities]
    grids = {d.shape for d in dens} | {(dens[0].shape[0], *np.shape(m)) for m in insides}
    expect(len(grids) == 1 and len(dens[0].shape) == 3, "null calibration maps",
           "one (windows, block grid) shape shared by all images", sorted(grids))
    values = np.stack([log_density(d) for d in dens], axis=1)  # (W, N, gh, gw)
    present = np.stack([np.asarray(m, bool) for m in insides])
    expect(int(present.sum()) >= MIN_BLOCKS, "null calibration", f"at least {MIN_BLOCKS} in-body blocks",
           int(present.sum()))
    return values, present


def _groups(groups, n: int) -> np.ndarray:
    labels = np.array([str(g) for g in groups] if groups is not None else [str(k) for k in range(n)])
    expect(labels.size == n, "groups", f"one group per image ({n})", labels.size)
    if np.unique(labels).size < 2:  # one patient: leave one image out instead
        labels = np.array([str(k) for k in range(n)])
    return labels


def slice_level(combined: np.ndarray, present: np.ndarray, labels: np.ndarray) -> tuple[dict[str, Any], Tail]:
    """The slice-level fit: each healthy image's largest combined z, its block p-value against the
    reference of the *other* groups, its in-body block count, and the effective fraction ``c``;
    returned with the tail of the whole reference.

    Args:
        combined: (N, gh, gw) held-out combined z-scores. present: (N, gh, gw) bool. labels: (N,) groups.
    """
    reference = np.sort(combined[present])
    tail = Tail.fit(reference)  # beyond the data: one tail for all (fitting one per group is not worth it)
    q, counts, maxima = [], [], []
    for k in range(combined.shape[0]):
        inside = present[k]
        if not inside.any():
            continue
        own = np.sort(combined[labels == labels[k]][present[labels == labels[k]]])
        z_max = float(combined[k][inside].max())
        at_least = (reference.size - np.searchsorted(reference, z_max)) - (own.size - np.searchsorted(own, z_max))
        others = reference.size - own.size
        q.append((1.0 + at_least) / (others + 1.0) if at_least >= MIN_EXCEEDANCES else float(tail.p_values(z_max)))
        counts.append(int(inside.sum()))
        maxima.append(z_max)
    q, counts = np.array(q), np.array(counts)
    c_ml = fit_effective_fraction(q, counts)
    c_tail = tail_effective_fraction(q, counts)
    c = c_ml if c_tail is None else c_tail
    return {"effective_fraction": c, "slices": len(q), "blocks_per_slice_median": float(np.median(counts)),
            "max_z_median": float(np.median(maxima)),
            "heldout_slice_rate_at_0.05": float(np.mean(family_p(q, counts, c) <= 0.05)),
            "effective_fraction_ml": c_ml,
            "heldout_slice_rate_at_0.05_ml": float(np.mean(family_p(q, counts, c_ml) <= 0.05)),
            "fit": (f"tail: the healthy slices' rank at family-wise {FIT_LEVEL:g}" if c_tail is not None else
                    f"maximum likelihood (fewer than {int(np.ceil(1 / FIT_LEVEL)) - 1} healthy slices for the tail fit)"),
            "note": "each slice's maximum scored against the other groups' blocks"}, tail


def fit_null(densities: Sequence[np.ndarray], covariates: Sequence[dict[str, np.ndarray]],
             insides: Sequence[np.ndarray], conditions: dict[str, Any], source: str, conditioning: str = "auto",
             groups: Sequence[str] | None = None, n_bins: int | None = None, shrinkage: float | None = None,
             spread: str = "predictive", fingerprints: Sequence[dict[str, str | None]] = (),
             centring: str = DEFAULT_CENTRING) -> NullModel:
    """Fit a null model on ID images.

    Args:
        densities: per image, (W, gh, gw) block densities of the W windows, or (gh, gw) for one
            window (nats per pixel).
        covariates: per image, :func:`klip_med.calibration.covariates.block_covariates`
            (``intensity``, ``texture``, ``edge_distance``; only the one the conditioning bins on is needed).
        insides: per image, (gh, gw) bool blocks inside the body.
        conditions: :func:`klip_med.calibration.conditions.null_conditions` (JSON-able).
        source: description of the ID images.
        conditioning: ``auto`` (the family among :data:`~klip_med.calibration.families.AUTO_FAMILIES`
            with the highest held-out log-likelihood of the ID blocks, leaving one group out at a
            time; uses no OOD data), ``position``, ``edge``, ``texture``, ``intensity`` or ``none``.
        groups: group of each image (e.g. the patient; default, or when all images share one
            group: each image alone).
        n_bins: covariate bins (default 8 for ``edge`` and ``texture``, 10 for ``intensity``).
        shrinkage: pseudo-observations ``k`` of the global mean per unit; None estimates them from
            the between-unit variance (``predictive``; ``legacy`` then uses 5).
        spread: :data:`~klip_med.calibration.families.SPREADS`.
        fingerprints: one ``{"key", "sha256"}`` per image (the overlap guard), or none.
        centring: :data:`~klip_med.calibration.centring.CENTRINGS`; with ``slice`` the families are
            fitted on level-free slices and each held-out healthy slice's residuals are centred (per
            window, in-body median removed) before the scale, the reference and the slice level are
            fitted, exactly as a scored slice is.
    """
    expect(conditioning in CONDITIONING, "conditioning", f"one of {CONDITIONING}", conditioning)
    expect(spread in SPREADS, "spread", f"one of {SPREADS}", spread)
    expect(centring in CENTRINGS, "centring", f"one of {CENTRINGS}", centring)
    expect(n_bins is None or (isinstance(n_bins, int) and n_bins >= 1), "n_bins", "an integer >= 1", n_bins)
    values, present = _inputs(densities, covariates, insides)
    n = values.shape[1]
    expect(len(fingerprints) in (0, n), "fingerprints", f"one per image ({n}) or none", len(fingerprints))
    labels = _groups(groups, n)
    if centring == "slice":  # the families are fitted on level-free slices; scoring centres residuals again
        values = level_free(values, present)
    extra: dict[str, Any] = {}
    heldout = {}
    if conditioning == "auto":
        heldout = {f: heldout_scores(values, covariates, present, labels, f, n_bins, shrinkage, spread, centring)
                   for f in AUTO_FAMILIES}
        scores = {f: ll for f, (_, ll) in heldout.items()}
        conditioning = max(scores, key=scores.get)
        extra["selection"] = {"heldout_loglik_nats_per_block_window": {k: round(v, 4) for k, v in scores.items()},
                              "groups": int(np.unique(labels).size), "chosen": conditioning}
    mean, std, edges = fit_family(values, covariates, present, conditioning, n_bins, shrinkage, spread)
    z_ref, _ = heldout.get(conditioning) or heldout_scores(values, covariates, present, labels, conditioning,
                                                            n_bins, shrinkage, spread, centring)
    summed = z_ref.sum(axis=0)  # (N, gh, gw), NaN outside the body
    scale = float(max(summed[present].std(), 1e-6))
    combined = summed / scale
    extra["slice_level"], tail = slice_level(np.where(present, combined, -np.inf), present, labels)
    y = values[:, present]
    extra.update({"n_blocks": int(present.sum()), "log_density_mean": y.mean(axis=1).tolist(),
                  "log_density_std": y.std(axis=1).tolist(), "shrinkage": shrinkage,
                  "reference": f"each block scored with its group left out ({np.unique(labels).size} groups)"})
    model = NullModel(dict(conditions), conditioning, mean, std, edges, scale, np.sort(combined[present]), n, source,
                      extra, extra["slice_level"]["effective_fraction"], spread,
                      tuple({"key": f.get("key"), "sha256": f.get("sha256")} for f in fingerprints), centring)
    model.__dict__["tail"] = tail  # the same reference: no second tail fit (cached_property's slot)
    return model
