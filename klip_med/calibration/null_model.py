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
- **block p-values**: the fraction of ID blocks whose z-score is at least as high,
  ``(1 + #{z_ref >= z}) / (n_ref + 1)``, with a fitted tail beyond the reference
  (:mod:`klip_med.calibration.tails`);
- **slice and volume p-values** of a maximum over many blocks (:mod:`klip_med.calibration.levels`);
- **thresholds**: per block at a false-positive rate, or per slice / volume at a family-wise rate.

Each position's (or bin's) spread is the predictive spread of a new healthy block
(:func:`klip_med.calibration.families.predictive_stats`): a position seldom inside the body is not
scored against a mean pulled towards the others with its own small spread.

Blocks are counted where at least half their pixels are inside the body mask, as everywhere in
klip_med. The model records the conditions it was fitted under (prior weights, operator, sampler
settings, windows, block size; :meth:`NullModel.check_conditions` refuses to apply it elsewhere)
and a fingerprint of each calibration image (:meth:`NullModel.overlap` finds them among the images
to be scored: a model must not score its own calibration images).

Stored as one JSON file (arrays as lists: a few thousand numbers), written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from klip_med._atomic import atomic_path
from klip_med.calibration.centring import CENTRINGS, centre_slice
from klip_med.calibration.conditions import differences
from klip_med.calibration.families import (
    CONDITIONING,
    COVARIATE,
    SPREADS,
    expected_stats,
    log_density,
    stack_covariate,
)
from klip_med.calibration.levels import family_p, family_threshold
from klip_med.calibration.tails import Tail
from klip_med.errors import KLIPMedError, check_keys, expect

NULL_FORMAT = "klip-med-null"
NULL_VERSION = 2
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
            ``conditioning="auto"`` chose; ``slice_level`` the fit of ``effective_fraction``.
        effective_fraction: independent tests per in-body block, ``c`` of
            :mod:`klip_med.calibration.levels` (slice and volume p-values, family-wise thresholds).
        spread: the per-unit spread estimator (:data:`klip_med.calibration.families.SPREADS`).
        fingerprints: one ``{"key", "sha256"}`` per calibration image: its manifest key
            (``name:file[index]``) and the SHA-256 of its float32 pixels in physical units (None
            where unknown, e.g. the prior's own samples have neither).
        centring: ``none`` or ``slice`` (each window's median over the slice's in-body blocks
            removed before combining: the patient's own level taken out;
            :mod:`klip_med.calibration.centring`). Scoring a slice-centred model needs the image's
            in-body blocks.
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
    effective_fraction: float = 1.0
    spread: str = "predictive"
    fingerprints: tuple[dict[str, str | None], ...] = ()
    centring: str = "none"

    @property
    def n_windows(self) -> int:
        return int(self.mean.shape[0])

    @cached_property
    def tail(self) -> Tail:
        """The reference z-scores with their fitted upper tail (block p-values beyond the data)."""
        return Tail.fit(self.reference_z)

    # ------------------------------------------------------------------ apply
    def window_z_scores(self, densities: np.ndarray, covariates: dict[str, np.ndarray] | None = None,
                        inside: np.ndarray | None = None) -> np.ndarray:
        """Per-window z-scores of one image's blocks, (W, gh, gw) (arguments as in :meth:`z_scores`)."""
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
        residual = d - mu
        if self.centring == "slice":
            expect(inside is not None, "inside", "the image's (gh, gw) in-body blocks for a slice-centred null model",
                   None)
            residual = centre_slice(residual, inside)
        return residual / sd

    def z_scores(self, densities: np.ndarray, covariates: dict[str, np.ndarray] | None = None,
                 inside: np.ndarray | None = None) -> np.ndarray:
        """Combined z-score of each block of one image, (gh, gw).

        Args:
            densities: (W, gh, gw) block densities of the model's windows ((gh, gw) when W = 1).
            covariates: :func:`block_covariates` of the image (needed for ``edge`` / ``intensity``).
            inside: (gh, gw) bool in-body blocks of the image (needed when ``centring="slice"``).
        """
        return self.window_z_scores(densities, covariates, inside).sum(axis=0) / self.scale

    def p_values(self, z: np.ndarray) -> np.ndarray:
        """Block p-values of z-scores against the ID reference (fitted tail beyond it), same shape, in (0, 1]."""
        return self.tail.p_values(z)

    def z_threshold(self, fpr: float) -> float:
        """Per block: the z-score that a fraction ``fpr`` of ID blocks reaches (flag ``z >= it``)."""
        expect(0.0 < float(fpr) < 1.0, "fpr", "a false-positive rate in (0, 1)", fpr)
        return self.tail.z_at(float(fpr))

    def family_p(self, z_max, n_blocks, volume: bool = False):
        """p-value of the largest z-score ``z_max`` of a slice (or with ``volume`` a volume) of
        ``n_blocks`` in-body blocks: how often a healthy one of that size reaches it
        (:func:`klip_med.calibration.levels.family_p`; volumes use the tail's safe fit)."""
        return family_p(self.tail.p_values(z_max, safe=volume), n_blocks, self.effective_fraction)

    def family_threshold(self, alpha: float, n_blocks: int, volume: bool = False) -> float:
        """The z-score that the largest of ``n_blocks`` healthy in-body blocks of a slice (or with
        ``volume`` a volume) reaches with probability ``alpha``."""
        return family_threshold(self.tail, alpha, n_blocks, self.effective_fraction, safe=volume)

    def overlap(self, fingerprints) -> list[str]:
        """Which of ``fingerprints`` (``{"key", "sha256"}`` dicts of images to be scored) are calibration
        images of this model, by key or by pixel digest: their keys (or digests)."""
        keys = {f.get("key") for f in self.fingerprints} - {None}
        digests = {f.get("sha256") for f in self.fingerprints} - {None}
        return [str(f.get("key") or f.get("sha256")) for f in fingerprints
                if (f.get("key") is not None and f.get("key") in keys)
                or (f.get("sha256") is not None and f.get("sha256") in digests)]

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
        d["fingerprints"] = [dict(f) for f in self.fingerprints]
        d["extra"] = {**d["extra"], "tail": self.tail.to_dict()}
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
        expect(data.get("version") == NULL_VERSION, f"{path}: version",
               f"{NULL_VERSION} (a model of another version: refit it with `klip-med calibrate`)", data.get("version"))
        fields = ("conditions", "conditioning", "mean", "std", "edges", "scale", "reference_z", "n_images", "source",
                  "extra", "effective_fraction", "spread", "fingerprints", "centring")
        check_keys(data, str(path), set(fields) | {"format", "version"}, set(fields) - {"extra", "centring"})
        centring = data.get("centring", "none")  # models written before centring existed are uncentred
        expect(centring in CENTRINGS, f"{path}: centring", f"one of {CENTRINGS}", centring)
        c = data["effective_fraction"]
        expect(isinstance(c, (int, float)) and 0 < c <= 1, f"{path}: effective_fraction", "a number in (0, 1]", c)
        expect(data["spread"] in SPREADS, f"{path}: spread", f"one of {SPREADS}", data["spread"])
        prints = data["fingerprints"]
        expect(isinstance(prints, list) and all(isinstance(f, dict) and set(f) <= {"key", "sha256"} for f in prints),
               f"{path}: fingerprints", "a list of {'key', 'sha256'} objects", type(prints).__name__)
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
        extra = {k: v for k, v in data.get("extra", {}).items() if k != "tail"}  # the tail is refitted on load
        return cls(data["conditions"], data["conditioning"], m, arrays["std"], arrays["edges"], float(scale),
                   np.sort(arrays["reference_z"]), int(data["n_images"]), str(data["source"]), extra, float(c),
                   data["spread"], tuple(dict(f) for f in prints), centring)
