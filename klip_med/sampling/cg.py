"""Fixed-iteration conjugate gradient for the proximal data-consistency step, with no host sync.

Solves ``min_x ||A x - y||^2 + (1/gamma) ||x - z||^2`` through the normal equations
``(A^T A + I / gamma) x = A^T y + z / gamma`` with exactly ``n_iter`` CG iterations.

It is deepinv's ``least_squares(..., solver="CG", tol=0)`` (same operations in the same order,
so the same numbers) without its two per-call host synchronisations (``torch.any(gamma <= 0)``
on a device tensor) and the per-iteration one (``torch.all(res_new < tol)``: with ``tol = 0``
that early stop can never fire, so dropping it changes nothing but the wait). Keeping the loop
free of syncs lets the GPU run ahead of Python and makes the step capturable by CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_EPS = 1e-8  # deepinv's conjugate_gradient default (denominator guard)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product over all but the batch dimension, shape (B, 1, ..., 1)."""
    return (a.conj() * b).sum(dim=tuple(range(1, a.ndim)), keepdim=True).real


def proximal_cg(
    A: Callable[[Tensor], Tensor],
    A_adjoint: Callable[[Tensor], Tensor],
    y: Tensor,
    z: Tensor,
    gamma: float,
    n_iter: int,
) -> Tensor:
    """``n_iter`` CG iterations from ``z`` on the proximal least-squares problem.

    Args:
        A, A_adjoint: the linear operator and its adjoint (images (B, C, H, W) <-> measurements).
        y: measurements (B, ...).
        z: the point to stay near, also the initial guess, (B, C, H, W).
        gamma: weight of the data term (> 0, validated by the caller).
        n_iter: iterations (>= 1).

    Returns:
        (B, C, H, W), the same dtype and device as ``z``.
    """
    inv_gamma = float(1.0 / torch.tensor(gamma, dtype=torch.float32))  # deepinv's float32 1/gamma, on the host

    def normal(v: Tensor) -> Tensor:
        return A_adjoint(A(v)) + inv_gamma * v

    b = A_adjoint(y) + inv_gamma * z
    x = z
    r = b - normal(x)
    p = r
    res_old = _dot(r, r)
    for i in range(n_iter):
        Ap = normal(p)
        alpha = res_old / (_dot(p, Ap) + _EPS)
        x = x + p * alpha
        r = r - Ap * alpha
        res_new = _dot(r, r)
        p = r + p * (res_new / (res_old + _EPS))
        res_old = res_new
        if i > 0 and i % 100 == 0:  # deepinv's periodic residual refresh
            r = b - normal(x)
            res_old = _dot(r, r)
    return x
