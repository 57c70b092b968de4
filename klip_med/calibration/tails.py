"""Block p-values against healthy reference z-scores, with a fitted tail beyond the data.

A slice- or volume-level decision needs block p-values far smaller than ``1 / n_ref`` (a 30-slice
volume tests thousands of blocks), where an empirical p-value has no resolution. As in permutation
testing (Knijnenburg et al., Bioinformatics 2009), the p-value is empirical where at least
:data:`MIN_EXCEEDANCES` reference z-scores reach it, and beyond that it comes from a parametric tail
fitted to the reference z-scores above their :data:`TAIL_QUANTILE` quantile: a Student-t (location,
scale, degrees of freedom among :data:`TAIL_DFS`, the Gaussian included) by maximum likelihood of the
truncated sample. z-scores are near-Gaussian by construction, with heavier tails where patients
differ; the t family covers both and, unlike a generalised Pareto fit with a negative shape, never
ends the tail at a finite z (which would give p = 0 beyond it).

Two tails are kept. The *best* fit (maximum likelihood) serves blocks and slices, whose p-values lie
close to the data (with 5,000 reference blocks, p = 2.5e-4 comes out 0.8-1.9x the truth on Gaussian
z-scores and 0.2-2.4x on Student-t(6) ones, 10th-90th percentile of 16 draws). The *safe* fit (the
heaviest tail the data cannot reject, :data:`PROFILE_NLL`) serves volumes, whose family-wise
decisions reach p = 1e-5 and below, where the best fit of a t(6) sample was 100x too small in one
draw in ten; the safe one erred on the large side (1-10x) in nine draws in ten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from klip_med.errors import expect

TAIL_QUANTILE = 0.9
"""Reference z-scores above this quantile are the sample the tail is fitted to."""
MIN_EXCEEDANCES = 10
"""Below this many reference z-scores at or above z, the fitted tail gives the p-value."""
TAIL_DFS = (2.0, 3.0, 4.0, 6.0, 10.0, 20.0, 50.0, math.inf)
"""Degrees of freedom tried for the tail (``inf``: Gaussian)."""
PROFILE_NLL = 1.92
"""The *safe* tail is the heaviest (smallest ``df``) whose truncated negative log-likelihood is within
this of the best (a 95% profile-likelihood interval for one parameter): a Gaussian-looking sample of
a moderately heavy tail is not taken for Gaussian, which would make far-tail p-values too small."""


def _distribution(df: float, loc: float, scale: float):
    return stats.norm(loc=loc, scale=scale) if math.isinf(df) else stats.t(df, loc=loc, scale=scale)


def _log_density(x: np.ndarray, df: float, loc: float, scale: float) -> np.ndarray:
    """Log density of the (location-scale) Student-t, or the Gaussian for ``df = inf``."""
    z = (x - loc) / scale
    if math.isinf(df):
        return -0.5 * z * z - math.log(scale) - 0.5 * math.log(2 * math.pi)
    const = special.gammaln((df + 1) / 2) - special.gammaln(df / 2) - 0.5 * math.log(df * math.pi) - math.log(scale)
    return const - (df + 1) / 2 * np.log1p(z * z / df)


def _log_survival(x: float, df: float, loc: float, scale: float) -> float:
    z = (x - loc) / scale
    return float(special.log_ndtr(-z) if math.isinf(df) else math.log(max(special.stdtr(df, -z), 1e-300)))


def _fit_truncated(sample: np.ndarray, u: float, df: float, start: tuple[float, float]) -> tuple[float, float, float]:
    """``(nll, loc, scale)`` of the law of ``sample`` given it lies above ``u``."""

    def nll(params: np.ndarray) -> float:
        loc, scale = float(params[0]), math.exp(float(params[1]))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            value = -(_log_density(sample, df, loc, scale).sum() - sample.size * _log_survival(u, df, loc, scale))
        return float(value) if np.isfinite(value) else 1e300

    best = optimize.minimize(nll, np.array([start[0], math.log(start[1])]), method="Nelder-Mead",
                             options={"xatol": 1e-5, "fatol": 1e-7, "maxiter": 2000})
    return float(best.fun), float(best.x[0]), float(math.exp(best.x[1]))


@dataclass(frozen=True)
class Tail:
    """Upper-tail model of the sorted reference z-scores.

    Attributes:
        reference: (n,) sorted reference z-scores.
        threshold: ``u``, the :data:`TAIL_QUANTILE` quantile of the reference.
        best, safe: ``(df, loc, scale)`` of the Student-t (``df = inf``: Gaussian) whose tail above
            ``u`` fits the reference best, and of the heaviest one within :data:`PROFILE_NLL`.
        exceedances: reference z-scores above ``u``.
    """

    reference: np.ndarray
    threshold: float
    best: tuple[float, float, float]
    safe: tuple[float, float, float]
    exceedances: int

    @classmethod
    def fit(cls, reference: np.ndarray) -> Tail:
        ref = np.sort(np.asarray(reference, dtype=np.float64))
        expect(ref.size >= 2 and bool(np.isfinite(ref).all()), "reference z-scores", "at least 2 finite values",
               f"{ref.size} values")
        u = float(np.quantile(ref, TAIL_QUANTILE))
        sample = ref[ref > u]
        start = (float(np.median(ref)), max(float(ref.std()), 1e-3))
        if sample.size < 5:  # too little to fit: a Cauchy-like tail around the whole reference
            fallback = (2.0, start[0], start[1])
            return cls(ref, u, fallback, fallback, int(sample.size))
        fits = [(*_fit_truncated(sample, u, df, start), df) for df in TAIL_DFS]
        top = min(fits, key=lambda f: f[0])
        # the heaviest tail the data cannot reject (profile likelihood, about 95% for one parameter)
        heavy = min((f for f in fits if f[0] <= top[0] + PROFILE_NLL), key=lambda f: f[3])
        return cls(ref, u, (top[3], top[1], top[2]), (heavy[3], heavy[1], heavy[2]), int(sample.size))

    @property
    def df(self) -> float:
        """Degrees of freedom of the best fit (``inf``: Gaussian)."""
        return self.best[0]

    @property
    def n(self) -> int:
        return int(self.reference.size)

    def _law(self, safe: bool):
        return _distribution(*(self.safe if safe else self.best))

    def _tail_sf(self, z: np.ndarray, safe: bool) -> np.ndarray:
        d = self._law(safe)
        frac = self.exceedances / (self.n + 1.0)
        return frac * np.exp(d.logsf(np.maximum(z, self.threshold)) - d.logsf(self.threshold))

    def p_values(self, z, safe: bool = False) -> np.ndarray:
        """Upper-tail p-values of ``z`` (any shape), in (0, 1]: ``(1 + #{ref >= z}) / (n + 1)`` where at
        least :data:`MIN_EXCEEDANCES` reference z-scores reach ``z``, the fitted tail beyond (the
        best fit, or with ``safe`` the heaviest one the data allow)."""
        z = np.asarray(z, dtype=np.float64)
        at_least = self.n - np.searchsorted(self.reference, z, side="left")
        empirical = (1.0 + at_least) / (self.n + 1.0)
        return np.where(at_least >= MIN_EXCEEDANCES, empirical, np.maximum(self._tail_sf(z, safe), 1e-300))

    def z_at(self, p: float, safe: bool = False) -> float:
        """The z-score whose p-value is ``p`` (a block at or above it has p-value <= ``p``)."""
        expect(0.0 < float(p) < 1.0, "p", "a probability in (0, 1)", p)
        if p * (self.n + 1.0) - 1.0 >= MIN_EXCEEDANCES:
            return float(np.quantile(self.reference, 1.0 - float(p), method="higher"))
        frac = self.exceedances / (self.n + 1.0)
        if p >= frac:
            return self.threshold
        d = self._law(safe)
        return float(d.isf(float(p) / frac * d.sf(self.threshold)))

    def to_dict(self) -> dict:
        def law(fit):
            df, loc, scale = fit
            return {"family": "gaussian" if math.isinf(df) else "student-t", "df": None if math.isinf(df) else df,
                    "loc": loc, "scale": scale}

        return {"threshold": self.threshold, "best": law(self.best), "safe": law(self.safe),
                "exceedances": self.exceedances, "quantile": TAIL_QUANTILE, "min_exceedances": MIN_EXCEEDANCES}
