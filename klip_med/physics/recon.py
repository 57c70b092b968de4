"""Measurement checks and the measurement-domain baseline reconstruction."""

from __future__ import annotations

import torch

from klip_med.errors import expect
from klip_med.physics.base import KLIPPhysicsMixin


def _check_physics(physics: object) -> KLIPPhysicsMixin:
    expect(
        isinstance(physics, KLIPPhysicsMixin),
        "physics",
        "an operator built by klip_med.physics (sparse_view_ct, cartesian_mri, ...)",
        type(physics).__name__,
    )
    return physics


def check_measurement(physics: KLIPPhysicsMixin, y: torch.Tensor) -> torch.Tensor:
    """Validate a measurement for ``physics``; return it unchanged.

    Raises :class:`KLIPMedError` naming ``y`` if it is not a tensor of shape
    ``(B, *physics.measurement_shape)`` or contains NaN/Inf, and naming ``physics`` if it is not a
    klip_med operator.
    """
    physics = _check_physics(physics)
    expect(isinstance(y, torch.Tensor), "y", "a torch.Tensor measurement", type(y).__name__)
    shape = "(B, " + ", ".join(str(s) for s in physics.measurement_shape) + ")"
    expect(
        y.dim() == 1 + len(physics.measurement_shape) and tuple(y.shape[1:]) == physics.measurement_shape,
        "y",
        f"a {physics.kind} measurement of shape {shape}",
        tuple(y.shape),
    )
    if not bool(torch.isfinite(y).all()):
        n_nan = int(torch.isnan(y).sum())
        n_inf = int(torch.isinf(y).sum())
        expect(False, "y", "finite measurement values", f"{n_nan} NaN and {n_inf} Inf values")
    return y


def baseline_reconstruction(physics: KLIPPhysicsMixin, y: torch.Tensor) -> torch.Tensor:
    """Classical reconstruction from ``y`` alone, ``(B, 1, H, W)``.

    CT: deepinv filtered back-projection (``Tomography.fbp``, ramp filter).
    MRI: zero-filled ``Re(A^H y)`` divided by the coil sensitivity ``sum_c |s_c|^2`` (1 for single
    coil), exact for a fully sampled noiseless acquisition.
    """
    check_measurement(physics, y)
    return physics.baseline(y)
