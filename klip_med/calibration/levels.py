"""Three levels of decision on healthy data: per block, per slice, per volume.

A block's p-value says how often a healthy block reaches its z-score. A slice holds ``n`` in-body
blocks, so its largest z-score is reached by chance far more often; a volume more often still.
The slice- and volume-level p-values here are those of the maximum, from the block p-value of the
maximum ``q`` and the number of blocks ``n``::

    p_family = 1 - (1 - q) ** (c * n)

``c`` (``effective_fraction``, 0 < c <= 1) is the number of independent tests per block: neighbouring
blocks and windows are correlated, so a slice behaves as ``c * n`` independent blocks. It is fitted
on healthy slices, each scored leaving its own patient out, at the family-wise level the SEG uses
(:func:`tail_effective_fraction`: the one-parameter form fitted by maximum likelihood,
:func:`fit_effective_fraction`, follows the bulk of the slice maxima, and on the LGG dev patients
left 11% of held-out healthy slices at ``p_family <= 0.05``), and then holds for slices and volumes of any size; a volume uses
all its in-body blocks (slices of one volume are more alike than slices of different patients, so
this errs on the safe side, and volumes use the safe fit of the block tail,
:class:`klip_med.calibration.tails.Tail`). Decisions at level ``alpha``:

- ``fwer``: flag the blocks with ``z >= z*``, where a healthy slice / volume of ``n`` blocks reaches
  ``z*`` with probability ``alpha`` (:func:`family_threshold`);
- ``fdr``: Benjamini-Hochberg over the blocks' p-values at level ``q`` (:func:`benjamini_hochberg`).
"""

from __future__ import annotations

import numpy as np

from klip_med.calibration.tails import Tail
from klip_med.errors import expect


def family_p(q, n_blocks, effective_fraction: float):
    """``1 - (1 - q) ** (c n)``: the p-value of a family's maximum with block p-value ``q`` over
    ``n_blocks`` blocks (arrays broadcast)."""
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
    n = np.asarray(n_blocks, dtype=np.float64)
    return -np.expm1(effective_fraction * np.maximum(n, 1.0) * np.log1p(-np.minimum(q, 1.0 - 1e-16)))


def fit_effective_fraction(q_min: np.ndarray, n_blocks: np.ndarray) -> float:
    """Maximum-likelihood ``c`` from healthy slices' block p-value of their maximum ``q_min`` and
    their in-body block counts: under the model ``Q`` has density ``c n (1 - q)^(c n - 1)``, so
    ``c = -S / sum(n_s log(1 - q_s))``; clipped to [1e-3, 1]."""
    q = np.clip(np.asarray(q_min, dtype=np.float64), 1e-12, 1.0 - 1e-12)
    n = np.asarray(n_blocks, dtype=np.float64)
    expect(q.size >= 2 and q.shape == n.shape and bool((n >= 1).all()), "slice maxima",
           "at least 2 healthy slices with their in-body block counts", f"{q.size} slices")
    return float(np.clip(-q.size / float(np.sum(n * np.log1p(-q))), 1e-3, 1.0))


FIT_LEVEL = 0.05
"""The family-wise level :func:`tail_effective_fraction` fits ``c`` at (the default SEG rule's)."""


def tail_effective_fraction(q_min: np.ndarray, n_blocks: np.ndarray, alpha: float = FIT_LEVEL) -> float | None:
    """``c`` fitted where the decision is made: the ``c`` at which ``k = floor(alpha (S + 1))`` of the
    ``S`` held-out healthy slices reach ``p_family <= alpha``.

    ``p_family`` grows with ``c``: slice ``s`` reaches ``alpha`` while ``c <= c_s = log(1 - alpha) /
    (n_s log(1 - q_s))``; ``c`` is the ``k``-th largest ``c_s`` (clipped to [1e-3, 1]), so a new slice exchangeable with the healthy ones
    is flagged at ``alpha`` with probability at most ``k / (S + 1) <= alpha`` (a conformal bound), and
    the same ``c`` gives slices and volumes of any size their p-values. None when ``k = 0`` (fewer
    than ``1 / alpha - 1`` slices: the caller keeps the maximum-likelihood fit)."""
    q = np.clip(np.asarray(q_min, dtype=np.float64), 1e-300, 1.0 - 1e-12)
    n = np.asarray(n_blocks, dtype=np.float64)
    expect(q.size >= 2 and q.shape == n.shape and bool((n >= 1).all()), "slice maxima",
           "at least 2 healthy slices with their in-body block counts", f"{q.size} slices")
    k = int(np.floor(float(alpha) * (q.size + 1) + 1e-9))
    if k < 1:
        return None
    reach = np.sort(np.log1p(-float(alpha)) / (n * np.log1p(-q)))[::-1]
    return float(np.clip(reach[k - 1], 1e-3, 1.0))


def family_threshold(tail: Tail, alpha: float, n_blocks: int, effective_fraction: float, safe: bool = False) -> float:
    """The z-score that the maximum of ``n_blocks`` healthy blocks reaches with probability ``alpha``
    (``safe``: with the tail's safe fit, for volumes)."""
    expect(0.0 < float(alpha) < 1.0, "alpha", "a family-wise error rate in (0, 1)", alpha)
    expect(int(n_blocks) >= 1, "n_blocks", "at least one block", n_blocks)
    per_block = -np.expm1(np.log1p(-float(alpha)) / (effective_fraction * int(n_blocks)))
    return tail.z_at(float(per_block), safe)


def benjamini_hochberg(p_values: np.ndarray, q: float) -> np.ndarray:
    """Benjamini-Hochberg at level ``q``: bool mask (same shape) of the rejected p-values."""
    expect(0.0 < float(q) < 1.0, "q", "a false-discovery rate in (0, 1)", q)
    p = np.asarray(p_values, dtype=np.float64)
    flat = p.ravel()
    m = flat.size
    if m == 0:
        return np.zeros(p.shape, dtype=bool)
    order = np.argsort(flat, kind="stable")
    passed = flat[order] <= q * np.arange(1, m + 1) / m
    keep = np.zeros(m, dtype=bool)
    if passed.any():
        keep[order[: int(np.flatnonzero(passed).max()) + 1]] = True
    return keep.reshape(p.shape)
