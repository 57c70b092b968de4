"""CT / MRI forward operators for klip_med: thin constructors over ``deepinv.physics``.

Every operator is a ``deepinv.physics.LinearPhysics`` taking real ``(B, 1, H, W)`` images
(``physics.image_shape == (1, H, W)``), validating shapes with :class:`klip_med.KLIPMedError`,
and carrying ``describe()`` metadata. See :mod:`klip_med.physics.ct` and
:mod:`klip_med.physics.mri` for units and conventions.
"""

from __future__ import annotations

from klip_med.physics.base import KLIPPhysicsMixin
from klip_med.physics.ct import CTOperator, limited_angle_ct, low_dose_ct, sparse_view_ct
from klip_med.physics.mri import RealImageOperator, cartesian_mask, cartesian_mri, multicoil_mri
from klip_med.physics.noise import (
    ClampedLogPoissonNoise,
    SequentialNoise,
    describe_noise,
    gaussian_noise,
    log_poisson_noise,
)
from klip_med.physics.recon import baseline_reconstruction, check_measurement
from klip_med.physics.spec import KINDS, parse_physics, parse_spec

__all__ = [
    "CTOperator",
    "ClampedLogPoissonNoise",
    "KINDS",
    "KLIPPhysicsMixin",
    "RealImageOperator",
    "SequentialNoise",
    "baseline_reconstruction",
    "cartesian_mask",
    "cartesian_mri",
    "check_measurement",
    "describe_noise",
    "gaussian_noise",
    "limited_angle_ct",
    "log_poisson_noise",
    "low_dose_ct",
    "multicoil_mri",
    "parse_physics",
    "parse_spec",
    "sparse_view_ct",
]
