"""Per-step, per-pixel KL contributions: the estimator's pure tensor math.

For one step with data-consistency change ``d`` (S, C, H, W) and injected noise std ``s``
(0-d or (S,)), the posterior and prior transition kernels are Gaussians with the same isotropic
covariance ``s^2 I``, so the KL between them is exact and splits over pixels::

    KL_k(i) = d_k(i)^2 / (2 s_k^2)          [nats]

Normalisations (the ``normalization`` argument everywhere):

``"transition"`` (default)
    ``d^2 / (2 s^2)``, the exact transition KL in nats. Steps with ``s = 0`` (deterministic)
    fall back to ``s^2 := g^2 dt`` (the ``"sde"`` rule) and are counted as fallbacks.
``"sde"``
    ``d^2 / (2 g^2 dt)``: the Girsanov density of the continuous path KL (paper Eq. 12)
    discretised on this step; defined for deterministic samplers too.
``"paper"``
    ``(d / g)^2``, the reference implementation's normalised update squared; the window result is
    its *mean* over the window's steps (not a sum), for parity with the reference code.

Combining posterior samples (the ``combine`` argument):

``"mean"`` (default)
    one map per sample, ``d`` of each sample squared; the maps are averaged afterwards.
``"square_of_mean"``
    the reference's PaDIS path: ``d`` is averaged over samples *before* squaring (the noise
    variance is averaged over samples too); one map results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from klip_med.errors import KLIPMedError

NORMALIZATIONS = ("transition", "sde", "paper")
COMBINES = ("mean", "square_of_mean")


def check_normalization(normalization: str) -> str:
    """Return ``normalization`` if valid, else raise listing the valid names."""
    if normalization not in NORMALIZATIONS:
        raise KLIPMedError(
            f"normalization: expected one of {list(NORMALIZATIONS)}, found {normalization!r}"
        )
    return normalization


def check_combine(combine: str) -> str:
    """Return ``combine`` if valid, else raise listing the valid names."""
    if combine not in COMBINES:
        raise KLIPMedError(f"combine: expected one of {list(COMBINES)}, found {combine!r}")
    return combine


def _per_sample(value: Tensor, n_samples: int, like: Tensor) -> Tensor:
    """Broadcast a 0-d or (S,) tensor to shape (S, 1, 1)."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value.expand(n_samples).reshape(n_samples, 1, 1)
    if value.shape != (n_samples,):
        raise KLIPMedError(
            f"noise_std: expected a scalar or one value per sample, shape ({n_samples},), "
            f"found shape {tuple(value.shape)}"
        )
    return value.reshape(n_samples, 1, 1)


def sde_variance(g: float | None, dt: float | None) -> float:
    """``g^2 * dt``, the variance an SDE step of length ``dt`` injects; raises if unknown."""
    if g is None or dt is None:
        raise KLIPMedError(
            "StepEvent.g / StepEvent.dt: expected both (the SDE diffusion coefficient and step "
            f"length) for the 'sde' / 'paper' normalisation or a deterministic step, found g={g}, dt={dt}"
        )
    if g <= 0 or dt <= 0:
        raise KLIPMedError(f"StepEvent.g / StepEvent.dt: expected > 0, found g={g}, dt={dt}")
    return float(g) ** 2 * float(dt)


def squared_change(delta: Tensor, combine: str = "mean") -> Tensor:
    """Per-pixel squared change summed over channels.

    Args:
        delta: ``d_k``, shape (S, C, H, W).
        combine: ``"mean"`` -> (S, H, W) per sample; ``"square_of_mean"`` -> (1, H, W) from the
            sample mean of ``d_k``.
    """
    if delta.ndim != 4:
        raise KLIPMedError(f"delta: expected shape (S, C, H, W), found {tuple(delta.shape)}")
    if combine == "square_of_mean":
        delta = delta.mean(dim=0, keepdim=True)
    return delta.square().sum(dim=1)


def step_pixel_kl(
    delta: Tensor,
    noise_std: Tensor,
    *,
    normalization: str = "transition",
    combine: str = "mean",
    g: float | None = None,
    dt: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One step's per-pixel contribution and whether it used the SDE fallback.

    Args:
        delta: ``d_k``, (S, C, H, W).
        noise_std: ``s_k``, 0-d or (S,).
        normalization, combine: see the module docstring.
        g, dt: the step's SDE diffusion coefficient and length (needed by ``sde``, ``paper`` and
            by ``transition`` on deterministic steps).

    Returns:
        ``(contribution, fell_back)``: contribution of shape (S, H, W) (``(1, H, W)`` for
        ``square_of_mean``), in nats for ``transition`` / ``sde``; ``fell_back`` a 0-d bool
        tensor, true when a ``transition`` step had ``s_k = 0`` and used ``g^2 dt`` instead.
        No host synchronisation happens here.
    """
    sq = squared_change(delta, combine)
    if normalization == "paper":
        if g is None or g <= 0:
            raise KLIPMedError(f"StepEvent.g: expected > 0 for the 'paper' normalisation, found {g}")
        return sq / float(g) ** 2, _false(sq)
    if normalization == "sde":
        return sq / (2.0 * sde_variance(g, dt)), _false(sq)
    check_normalization(normalization)
    var = _per_sample(noise_std, delta.shape[0], sq).square()
    if combine == "square_of_mean":
        var = var.mean(dim=0, keepdim=True)
    deterministic = var <= 0
    # Deterministic steps fall back to g^2 dt; without g / dt they become NaN, and the
    # accumulator refuses to return such a map (see KLIPAccumulator.result).
    fallback = float("nan") if g is None or dt is None else sde_variance(g, dt)
    var = torch.where(deterministic, torch.full_like(var, fallback), var)
    return sq / (2.0 * var), deterministic.any()


def _false(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.bool, device=like.device)
