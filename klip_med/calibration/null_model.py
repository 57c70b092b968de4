"""Null calibration of KLIP block maps: how much KL does a block carry when nothing is out of
distribution?

A :class:`NullModel` is fitted on in-distribution (ID) reconstructions only: held-out healthy
slices, or the prior's own samples, measured with the same operator and reconstructed with the
same sampler settings. It needs no out-of-distribution data. It turns a block map into

- **z-scores**: the log block density standardised against comparable ID blocks: at the same
  place (``"position"``: the excess KL over what the operator and the usual anatomy produce
  there, e.g. sparse-view CT's radial bump or the skull edge), at the same distance to the body
  edge (``"edge"``), of the same amount of anatomy (posterior-mean block std, ``"texture"``), of
  the same posterior-mean brightness (``"intensity"``), or all of them (``"none"``). ``"auto"`` (the default) picks among position / edge / none the family that
  predicts held-out ID blocks best: a choice made with ID data only. Several windows are combined
  into one z-score (Stouffer, with the spread of the sum measured on ID data);
- **p-values**: the fraction of ID blocks whose z-score is at least as high,
  ``(1 + #{z_ref >= z}) / (n_ref + 1)`` (conservative empirical p-value);
- a **threshold** at a chosen false-positive rate: the z above which that fraction of ID blocks lies.

Blocks are counted where at least half their pixels are inside the body mask, as everywhere in
klip_med. The model records the conditions it was fitted under (prior weights, operator, sampler
settings, window, block size); :meth:`NullModel.check_conditions` refuses to apply it elsewhere.

Stored as one JSON file (arrays as lists: a few thousand numbers), written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klip_med._atomic import atomic_path
from klip_med.calibration.conditions import differences
from klip_med.calibration.families import (
    AUTO_FAMILIES,
    CONDITIONING,
    COVARIATE,
    expected_stats,
    fit_family,
    heldout_scores,
    log_density,
    stack_covariate,
)
from klip_med.errors import KLIPMedError, check_keys, expect

NULL_FORMAT = "klip-med-null"
NULL_VERSION = 1
MIN_BLOCKS = 8
"""A model needs at least this many in-body ID blocks in all."""


@dataclass(frozen=True)
class NullModel:
    """Reference distribution of block KL under the null (see the module docstring).

    A model covers W windows (diffusion-time ranges of the same run). Each window's log block
    density is standardised on its own; the block's score is the sum over windows divided by
    ``scale``, the spread of that sum over the ID blocks (Stouffer's combination, with the
    windows' correlation measured rather than assumed), so it is a z-score again and no window has
    to be chosen. With W = 1 it is the window's own z-score.

    Attributes:
        conditions: what it was fitted under (prior, physics, sampler settings, windows, block size).
        conditioning: what a block is compared with: ``position`` (the same block of the ID images:
            removes what the operator and the typical anatomy produce at that place, e.g. the radial
            bump of sparse-view CT or the skull edge), ``edge`` (ID blocks at the same distance to
            the body edge), ``texture`` (ID blocks holding as much anatomy: posterior-mean block
            std), ``intensity`` (ID blocks of the same posterior-mean brightness) or ``none`` (all
            ID blocks).
        mean, std: log-density statistics per window: (W, gh, gw) for ``position``, (W, n_bins)
            for ``edge`` / ``texture`` / ``intensity``, (W, 1) for ``none``.
        edges: (n_bins - 1,) bin edges of the covariate (empty for ``position`` / ``none``).
        scale: spread of the summed window z-scores over ID blocks.
        reference_z: (n_ref,) sorted combined z-scores of the ID blocks, each computed with its own
            group (patient) left out (what p-values are counted against).
        n_images: ID images the blocks came from.
        source: where the ID images came from (manifest split, prior samples, ...).
        extra: fit details; ``selection`` holds the held-out log-likelihood of each family when
            ``conditioning="auto"`` chose.
    """

    conditions: dict[str, Any]
    conditioning: str
    mean: np.ndarray
    std: np.ndarray
    edges: np.ndarray
    scale: float
    reference_z: np.ndarray
    n_images: int
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_windows(self) -> int:
        return int(self.mean.shape[0])

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, densities: Sequence[np.ndarray], covariates: Sequence[dict[str, np.ndarray]],
            insides: Sequence[np.ndarray], conditions: dict[str, Any], source: str, conditioning: str = "auto",
            groups: Sequence[str] | None = None, n_bins: int | None = None, shrinkage: float = 5.0) -> NullModel:
        """Fit on ID images.

        Args:
            densities: per image, (W, gh, gw) block densities of the W windows, or (gh, gw) for one
                window (nats per pixel).
            covariates: per image, :func:`block_covariates` (``intensity``, ``texture``,
                ``edge_distance``; only the one the conditioning bins on is needed).
            insides: per image, (gh, gw) bool blocks inside the body.
            conditions: see :attr:`conditions` (JSON-able).
            source: description of the ID images.
            conditioning: ``auto`` (the family among :data:`AUTO_FAMILIES` with the highest held-out
                log-likelihood of the ID blocks, leaving one group out at a time; uses no OOD data),
                ``position``, ``edge``, ``texture``, ``intensity`` or ``none``.
            groups: group of each image (e.g. the patient; default, or when all images share one
                group: each image alone). ``auto`` leaves one group out to choose the family, and
                the reference z-scores are each computed with their group left out, so that
                p-values include the spread between groups that a new patient brings.
            n_bins: covariate bins (default 8 for ``edge`` and ``texture``, 10 for ``intensity``).
            shrinkage: pseudo-observations of the global statistics per position (``position``).
        """
        expect(conditioning in CONDITIONING, "conditioning", f"one of {CONDITIONING}", conditioning)
        n = len(densities)
        expect(n == len(covariates) == len(insides) and n >= 2, "null calibration",
               "the same number (>= 2) of density, covariate and inside maps",
               f"{len(densities)}, {len(covariates)}, {len(insides)}")
        expect(n_bins is None or (isinstance(n_bins, int) and n_bins >= 1), "n_bins", "an integer >= 1", n_bins)
        dens = [np.asarray(d)[None] if np.ndim(d) == 2 else np.asarray(d) for d in densities]
        grids = {d.shape for d in dens} | {(dens[0].shape[0], *np.shape(m)) for m in insides}
        expect(len(grids) == 1 and len(dens[0].shape) == 3, "null calibration maps",
               "one (windows, block grid) shape shared by all images", sorted(grids))
        values = np.stack([log_density(d) for d in dens], axis=1)  # (W, N, gh, gw)
        present = np.stack([np.asarray(m, bool) for m in insides])
        expect(int(present.sum()) >= MIN_BLOCKS, "null calibration", f"at least {MIN_BLOCKS} in-body blocks",
               int(present.sum()))
        extra: dict[str, Any] = {}
        labels = np.array([str(g) for g in groups] if groups is not None else [str(k) for k in range(n)])
        expect(labels.size == n, "groups", f"one group per image ({n})", labels.size)
        if np.unique(labels).size < 2:  # one patient: leave one image out instead
            labels = np.array([str(k) for k in range(n)])
        heldout = {}
        if conditioning == "auto":
            heldout = {f: heldout_scores(values, covariates, present, labels, f, n_bins, shrinkage) for f in AUTO_FAMILIES}
            scores = {f: ll for f, (_, ll) in heldout.items()}
            conditioning = max(scores, key=scores.get)
            extra["selection"] = {"heldout_loglik_nats_per_block_window": {k: round(v, 4) for k, v in scores.items()},
                                  "groups": int(np.unique(labels).size), "chosen": conditioning}
        mean, std, edges = fit_family(values, covariates, present, conditioning, n_bins, shrinkage)
        z_ref, _ = heldout.get(conditioning) or heldout_scores(values, covariates, present, labels, conditioning, n_bins,
                                                         shrinkage)
        summed = z_ref.sum(axis=0)[present]
        scale = float(max(summed.std(), 1e-6))
        y = values[:, present]
        extra.update({"n_blocks": int(present.sum()), "log_density_mean": y.mean(axis=1).tolist(),
                      "log_density_std": y.std(axis=1).tolist(),
                      "shrinkage": shrinkage if conditioning == "position" else None,
                      "reference": f"each block scored with its group left out ({np.unique(labels).size} groups)"})
        return cls(dict(conditions), conditioning, mean, std, edges, scale, np.sort(summed / scale), n, source, extra)

    # ------------------------------------------------------------------ apply
    def window_z_scores(self, densities: np.ndarray, covariates: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Per-window z-scores of one image's blocks, (W, gh, gw) (``covariates`` as in :meth:`fit`)."""
        d = log_density(densities)
        d = d[None] if d.ndim == 2 else d
        expect(d.ndim == 3 and d.shape[0] == self.n_windows, "densities",
               f"(windows={self.n_windows}, gh, gw) block densities", d.shape)
        cov = None
        if self.conditioning == "position":
            expect(d.shape == self.mean.shape, "densities", f"the block grid {self.mean.shape[1:]} of the null model",
                   d.shape[1:])
        elif self.conditioning in COVARIATE:
            cov = stack_covariate([covariates or {}], self.conditioning, (1, *d.shape[1:]))[0]
        mu, sd = expected_stats(self.mean, self.std, self.edges, self.conditioning, cov)
        return (d - mu) / sd

    def z_scores(self, densities: np.ndarray, covariates: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Combined z-score of each block of one image, (gh, gw).

        Args:
            densities: (W, gh, gw) block densities of the model's windows ((gh, gw) when W = 1).
            covariates: :func:`block_covariates` of the image (needed for ``edge`` / ``intensity``).
        """
        return self.window_z_scores(densities, covariates).sum(axis=0) / self.scale

    def p_values(self, z: np.ndarray) -> np.ndarray:
        """Empirical upper-tail p-values of z-scores against the ID reference, same shape, in (0, 1]."""
        z = np.asarray(z, dtype=np.float64)
        n = self.reference_z.size
        at_least = n - np.searchsorted(self.reference_z, z, side="left")
        return (1.0 + at_least) / (n + 1.0)

    def z_threshold(self, fpr: float) -> float:
        """The z-score at and above which a fraction ``fpr`` of ID blocks lies (flag ``z >= it``)."""
        expect(0.0 < float(fpr) < 1.0, "fpr", "a false-positive rate in (0, 1)", fpr)
        return float(np.quantile(self.reference_z, 1.0 - float(fpr), method="higher"))

    def check_conditions(self, conditions: dict[str, Any], where: str = "null model") -> None:
        """Raise :class:`KLIPMedError` naming each condition that differs from the fitted one."""
        diffs = differences(self.conditions, conditions)
        if diffs:
            raise KLIPMedError(f"{where}: expected the conditions it was calibrated under, found "
                               + "; ".join(diffs) + " (run `klip-med calibrate` with these settings)")

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("mean", "std", "edges", "reference_z"):
            d[k] = np.asarray(d[k]).tolist()
        d["scale"] = float(d["scale"])
        return {"format": NULL_FORMAT, "version": NULL_VERSION, **d}

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON, atomically; returns the path."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=1)
        return path

    @classmethod
    def load(cls, path: str | Path) -> NullModel:
        """Read a model written by :meth:`save`; :class:`KLIPMedError` naming the file otherwise."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KLIPMedError(f"{path}: expected a klip-med null model (JSON), found {type(exc).__name__}: {exc}") from exc
        expect(isinstance(data, dict) and data.get("format") == NULL_FORMAT, str(path),
               f"a JSON object with format {NULL_FORMAT!r}", data.get("format") if isinstance(data, dict) else type(data).__name__)
        expect(data.get("version") == NULL_VERSION, f"{path}: version", NULL_VERSION, data.get("version"))
        fields = ("conditions", "conditioning", "mean", "std", "edges", "scale", "reference_z", "n_images", "source",
                  "extra")
        check_keys(data, str(path), set(fields) | {"format", "version"}, set(fields) - {"extra"})
        expect(data["conditioning"] in CONDITIONING[1:], f"{path}: conditioning", f"one of {CONDITIONING[1:]}",
               data["conditioning"])
        try:
            arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("mean", "std", "edges", "reference_z")}
        except (TypeError, ValueError) as exc:
            raise KLIPMedError(f"{path}: expected numeric arrays mean / std / edges / reference_z, found {exc}") from exc
        m = arrays["mean"]
        binned = m.ndim == 2 and m.shape[1:] == (arrays["edges"].size + 1,)
        want = {"position": m.ndim == 3, "none": m.ndim == 2 and m.shape[1:] == (1,), "intensity": binned,
                "edge": binned, "texture": binned}.get(data["conditioning"], False)
        scale = data["scale"]
        ok = (want and arrays["std"].shape == m.shape and arrays["reference_z"].size > 0
              and all(np.isfinite(a).all() for a in arrays.values()) and bool((arrays["std"] > 0).all())
              and isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0)
        expect(ok, f"{path}: arrays", "finite mean / std of the conditioning's shape (std > 0), a scale > 0 and a "
               "non-empty reference", {**{k: list(a.shape) for k, a in arrays.items()}, "scale": scale})
        return cls(data["conditions"], data["conditioning"], m, arrays["std"], arrays["edges"], float(scale),
                   np.sort(arrays["reference_z"]), int(data["n_images"]), str(data["source"]), data.get("extra", {}))
