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

from klip_med.calibration.centring import centre_slice
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


SPREADS = ("predictive", "legacy")
"""How a family's per-unit spread is estimated. ``predictive`` (the default): the predictive
variance of a new block under a normal hierarchical model of the units (positions or bins), with
the shrinkage strength estimated from the data and the shrinkage bias added; ``legacy``: the first
round's estimator (fixed pseudo-observations, no term for the pull), kept to measure the change."""
VARIANCE_PSEUDO = 5.0
"""Pseudo-observations that pull a unit's own variance towards the pooled within-unit variance."""
TAU_FLOOR = 1e-3
"""Smallest between-unit variance, as a fraction of the within-unit variance (keeps k finite)."""


def predictive_stats(y: np.ndarray, unit: np.ndarray, n_units: int,
                     shrinkage: float | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Per-unit mean and predictive std of a new observation, from observations ``y`` of ``unit``.

    The model: unit means ``theta_j ~ N(mu, tau^2)``, observations ``y ~ N(theta_j, sigma_j^2)``.
    With ``n_j`` observations of mean ``ybar_j`` and ``k = sigma_w^2 / tau^2`` (``sigma_w^2`` the pooled
    within-unit variance, ``tau^2`` the between-unit variance by the method of moments):

    - mean: ``m_j = (n_j ybar_j + k mu) / (n_j + k)`` (``mu`` for an unseen unit);
    - spread: ``s_j^2 (1 + 1 / (n_j + k)) + (m_j - ybar_j)^2``: the unit's own variance ``s_j^2``
      (pulled towards ``sigma_w^2`` by :data:`VARIANCE_PSEUDO` observations) times the normal model's
      predictive factor, plus the squared shrinkage bias, so a unit seen a few times far from the
      rest is not scored against the pulled mean with its own small spread. An unseen unit gets
      ``sigma_w^2 + tau^2``.

    Args:
        y: (M,) observations (log block densities). unit: (M,) int unit of each, in [0, n_units).
        shrinkage: ``k`` fixed by the caller; None estimates it (empirical Bayes).

    Returns:
        ``(mean, std, info)``: (n_units,) each; info holds ``within_var``, ``between_var``, ``k``.
    """
    y = np.asarray(y, dtype=np.float64)
    unit = np.asarray(unit, dtype=np.int64)
    n = np.bincount(unit, minlength=n_units).astype(np.float64)
    s1 = np.bincount(unit, weights=y, minlength=n_units)
    mu = float(y.mean())
    ybar = np.where(n > 0, s1 / np.maximum(n, 1.0), mu)
    ss = np.bincount(unit, weights=(y - ybar[unit]) ** 2, minlength=n_units)
    dof = float(np.maximum(n - 1.0, 0.0).sum())
    within = max(float(ss.sum() / dof) if dof > 0 else float(y.var()), 1e-12)
    seen = n >= 2
    between = TAU_FLOOR * within
    if int(seen.sum()) >= 2:
        between = max(float(np.mean((ybar[seen] - mu) ** 2) - np.mean(within / n[seen])), between)
    k = within / between if shrinkage is None else float(shrinkage)
    mean = (s1 + k * mu) / (n + k)
    own = (ss + VARIANCE_PSEUDO * within) / (np.maximum(n - 1.0, 0.0) + VARIANCE_PSEUDO)
    bias = np.where(n > 0, mean - ybar, 0.0)
    var = own * (1.0 + 1.0 / (n + k)) + bias**2
    return mean, np.sqrt(np.maximum(var, 1e-12)), {"within_var": within, "between_var": between, "k": k}


def legacy_position_stats(values: np.ndarray, present: np.ndarray, prior_mean: float,
                          strength: float) -> tuple[np.ndarray, np.ndarray]:
    """The first round's per-position statistics (``spread="legacy"``): mean and std shrunk with
    ``strength`` pseudo-observations, the std without a term for the pull. values, present: (N, gh, gw)."""
    n = present.sum(axis=0)
    s1 = np.where(present, values, 0.0).sum(axis=0)
    own_mean = s1 / np.maximum(n, 1)
    ss = np.where(present, (values - own_mean) ** 2, 0.0).sum(axis=0)
    dof = np.maximum(n - 1, 0).sum()
    within_var = max(float(ss.sum() / dof) if dof > 0 else float(np.var(values[present])), 1e-12)
    mean = (s1 + strength * prior_mean) / (n + strength)
    var = (ss + strength * within_var) / (np.maximum(n - 1, 0) + strength)
    return mean, np.sqrt(np.maximum(var, 1e-12))


def window_stats(values: np.ndarray, covariate: np.ndarray | None, present: np.ndarray, conditioning: str,
                 edges: np.ndarray, shrinkage: float | None, spread: str = "predictive") -> tuple[np.ndarray, np.ndarray]:
    """One window's statistics: ``(mean, std)``, (gh, gw) for ``position``, (n_bins,) otherwise.

    values: (N, gh, gw) log densities; covariate: (N, gh, gw) binned covariate (binned families);
    present: (N, gh, gw) bool. ``shrinkage``: None estimates it (``predictive``; ``legacy`` uses 5)."""
    y = values[present]
    if conditioning == "position":
        grid = values.shape[1:]
        if spread == "legacy":
            return legacy_position_stats(values, present, float(y.mean()), 5.0 if shrinkage is None else shrinkage)
        unit = np.broadcast_to(np.arange(int(np.prod(grid))).reshape(grid), values.shape)[present]
        mean, std, _ = predictive_stats(y, unit, int(np.prod(grid)), shrinkage)
        return mean.reshape(grid), std.reshape(grid)
    bins = np.searchsorted(edges, covariate, side="right") if covariate is not None else np.zeros(values.shape, int)
    if spread == "predictive":
        mean, std, _ = predictive_stats(y, bins[present], edges.size + 1, shrinkage)
        return mean, std
    g_mean, g_var = float(y.mean()), float(max(y.var(), 1e-12))
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


def fit_family(values, covariates, present, conditioning, n_bins, shrinkage, spread="predictive"):
    """(mean, std, edges) of one family; values (W, N, gh, gw)."""
    cov = stack_covariate(covariates, conditioning, present.shape)
    edges = np.array([])
    if cov is not None:
        bins = n_bins or BINS[conditioning]
        if bins > 1:
            edges = np.unique(np.quantile(cov[present], np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    stats = [window_stats(v, cov, present, conditioning, edges, shrinkage, spread) for v in values]
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


def heldout_scores(values, covariates, present, groups, family, n_bins, shrinkage,
                   spread="predictive", centring="none") -> tuple[np.ndarray, float]:
    """Each group's ID blocks scored under the family fitted on the other groups (with ``centring``
    ``slice``, each image's residuals centred as :mod:`klip_med.calibration.centring` scores a slice).

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
                              present[train], family, n_bins, shrinkage, spread)
        cov = stack_covariate([c for c, t in zip(covariates, test, strict=True) if t], family, present[test].shape)
        for k, idx in enumerate(np.flatnonzero(test)):
            mu, sd = expected_stats(mean, std, edges, family, None if cov is None else cov[k])
            m = present[idx]
            residual = values[:, idx] - mu
            if centring == "slice":
                residual = centre_slice(residual, m)
            zk = (residual / sd)[:, m]
            z[:, idx][:, m] = zk
            log_sd = np.log(np.broadcast_to(sd, values[:, idx].shape))[:, m]
            total += float((-0.5 * zk**2 - log_sd - 0.5 * np.log(2 * np.pi)).sum())
    return z, total / max(int(present.sum()) * values.shape[0], 1)


