"""The statistics behind a null model: log block densities, the comparison families
(``position``, ``edge``, ``texture``, ``intensity``, ``none``), their fit with shrinkage, and the
held-out scoring by which ``auto`` chooses a family and p-values get their reference.

Arrays: ``values`` (W, N, gh, gw) log densities of W windows over N images; ``present`` (N, gh, gw)
bool, blocks inside the body; ``covariates`` one dict of (gh, gw) maps per image
(:func:`klip_med.calibration.covariates.block_covariates`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from klip_med.errors import expect

DENSITY_FLOOR = 1e-12
"""Added to block densities (nats per pixel) before the log: a block with zero KL stays finite."""
MIN_BIN_BLOCKS = 20
"""A bin with fewer ID blocks than this borrows the global mean / spread."""


def log_density(densities: np.ndarray) -> np.ndarray:
    """``log(density + DENSITY_FLOOR)``, float64; densities must be finite and >= 0 (nats per pixel)."""
    d = np.asarray(densities, dtype=np.float64)
    expect(bool(np.isfinite(d).all()) and bool((d >= 0).all()), "densities",
           "finite block densities >= 0 (nats per pixel)", "NaN / Inf or negative values")
    return np.log(d + DENSITY_FLOOR)


CONDITIONING = ("auto", "position", "edge", "texture", "intensity", "none")
"""Null families. ``auto`` picks among :data:`AUTO_FAMILIES` by held-out ID likelihood."""
AUTO_FAMILIES = ("none", "position", "edge")
"""What ``auto`` chooses from: covariates a lesion inside the body cannot change (its place, its
distance to the body edge). Brightness is left out: a lesion changes it, so conditioning on it
explains the lesion away (it fits healthy KL best and localises worst; docs/research-log.md)."""
COVARIATE = {"intensity": "intensity", "edge": "edge_distance", "texture": "texture"}
BINS = {"intensity": 10, "edge": 8, "texture": 8}


def shrunk_position_stats(values: np.ndarray, present: np.ndarray, prior_mean: float, strength: float,
            within_var: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-position mean and std over images, shrunk towards the global mean and the pooled
    within-position variance with ``strength`` pseudo-observations (a block seldom inside the body
    borrows them).

    Args:
        values: (N, gh, gw) log densities. present: (N, gh, gw) bool (block inside the body).
        within_var: pooled within-position variance to shrink to (default: computed here).

    Returns:
        ``(mean, std, within_var)``, mean and std (gh, gw).
    """
    n = present.sum(axis=0)
    s1 = np.where(present, values, 0.0).sum(axis=0)
    own_mean = s1 / np.maximum(n, 1)
    ss = np.where(present, (values - own_mean) ** 2, 0.0).sum(axis=0)
    if within_var is None:
        dof = np.maximum(n - 1, 0).sum()
        within_var = float(ss.sum() / dof) if dof > 0 else float(np.var(values[present]))
        within_var = max(within_var, 1e-12)
    mean = (s1 + strength * prior_mean) / (n + strength)
    var = (ss + strength * within_var) / (np.maximum(n - 1, 0) + strength)
    return mean, np.sqrt(np.maximum(var, 1e-12)), within_var


def window_stats(values: np.ndarray, covariate: np.ndarray | None, present: np.ndarray, conditioning: str,
                  edges: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """One window's statistics: ``(mean, std)``, (gh, gw) for ``position``, (n_bins,) otherwise.

    values: (N, gh, gw) log densities; covariate: (N, gh, gw) binned covariate (binned families);
    present: (N, gh, gw) bool."""
    y = values[present]
    g_mean, g_var = float(y.mean()), float(max(y.var(), 1e-12))
    if conditioning == "position":
        mean, std, _ = shrunk_position_stats(values, present, g_mean, shrinkage)
        return mean, std
    bins = np.searchsorted(edges, covariate, side="right") if covariate is not None else np.zeros(values.shape, int)
    mean = np.full(edges.size + 1, g_mean)
    std = np.full(edges.size + 1, np.sqrt(g_var))
    for b in range(edges.size + 1):
        sel = values[present & (bins == b)]
        if sel.size >= MIN_BIN_BLOCKS:
            mean[b], std[b] = sel.mean(), max(sel.std(), 1e-6)
    return mean, std


def stack_covariate(covariates: Sequence[dict[str, np.ndarray]], conditioning: str, shape) -> np.ndarray | None:
    if conditioning not in COVARIATE:
        return None
    key = COVARIATE[conditioning]
    missing = [k for k, c in enumerate(covariates) if key not in c]
    expect(not missing, "covariates", f"a {key!r} map per image for {conditioning} conditioning",
           f"none for images {missing[:5]}")
    out = np.stack([np.asarray(c[key], np.float64) for c in covariates])
    expect(out.shape == shape, f"covariates[{key!r}]", f"one (gh, gw) map per image {shape}", out.shape)
    return out


def fit_family(values, covariates, present, conditioning, n_bins, shrinkage):
    """(mean, std, edges) of one family; values (W, N, gh, gw)."""
    cov = stack_covariate(covariates, conditioning, present.shape)
    edges = np.array([])
    if cov is not None:
        bins = n_bins or BINS[conditioning]
        if bins > 1:
            edges = np.unique(np.quantile(cov[present], np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    stats = [window_stats(v, cov, present, conditioning, edges, shrinkage) for v in values]
    mean = np.stack([m for m, _ in stats])
    std = np.stack([s for _, s in stats])
    if conditioning == "none":
        mean, std = mean[:, :1], std[:, :1]
    return mean, std, edges


def expected_stats(mean, std, edges, conditioning, covariate):
    """Per-window expected log density and its spread for blocks with ``covariate``: (W, gh, gw) each."""
    if conditioning == "position":
        return mean, std
    if conditioning == "none":
        return mean[:, :, None], std[:, :, None]
    b = np.searchsorted(edges, covariate, side="right")
    return mean[:, b], std[:, b]


def heldout_scores(values, covariates, present, groups, family, n_bins, shrinkage) -> tuple[np.ndarray, float]:
    """Each group's ID blocks scored under the family fitted on the other groups.

    Returns:
        ``(z, loglik)``: per-window z-scores (W, N, gh, gw; NaN outside the body), the reference
        p-values are counted against (so it holds the spread *between* groups, e.g. patients, that
        a new patient brings); and the mean Gaussian log-likelihood of those blocks (nats per
        block and window), by which ``auto`` chooses the family.
    """
    z = np.full(values.shape, np.nan)
    total = 0.0
    for g in np.unique(groups):
        test, train = groups == g, groups != g
        mean, std, edges = fit_family(values[:, train], [c for c, t in zip(covariates, train, strict=True) if t],
                                       present[train], family, n_bins, shrinkage)
        cov = stack_covariate([c for c, t in zip(covariates, test, strict=True) if t], family, present[test].shape)
        for k, idx in enumerate(np.flatnonzero(test)):
            mu, sd = expected_stats(mean, std, edges, family, None if cov is None else cov[k])
            m = present[idx]
            zk = ((values[:, idx] - mu) / sd)[:, m]
            z[:, idx][:, m] = zk
            log_sd = np.log(np.broadcast_to(sd, values[:, idx].shape))[:, m]
            total += float((-0.5 * zk**2 - log_sd - 0.5 * np.log(2 * np.pi)).sum())
    return z, total / max(int(present.sum()) * values.shape[0], 1)


