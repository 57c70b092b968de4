"""Parallel-beam CT operators over :class:`deepinv.physics.Tomography`.

Units and conventions (all constructors):

* Images are real ``(B, 1, N, N)`` tensors in the prior's intensity range (attenuation-like,
  ideally >= 0), ``N = image_size``.
* Sinograms are ``(B, 1, D, V)``: ``D`` detector cells (``ceil(sqrt(2) * N)`` when
  ``circle=False``, ``N`` when ``circle=True``) by ``V`` views. Values are line integrals of the
  image with **unit pixel spacing and no normalisation** (``normalize=False`` in deepinv), so a ray
  through ``L`` pixels of intensity 1 measures ``L``; sinogram magnitudes grow linearly with ``N``.
* Angles are in degrees (``physics.angles``), parallel beam, so 180 degrees is a full scan.
* The adjoint is deepinv's exact autograd adjoint (``adjoint_via_backprop=True``); deepinv's
  unfiltered back-projection (``IRadon``) is only an approximate adjoint (~1.5% relative error).
* ``baseline`` / :func:`klip_med.physics.baseline_reconstruction` is deepinv's ramp-filtered
  back-projection ``Tomography.fbp``, which weights each view by ``pi / (2 V)`` as if the ``V``
  views covered 180 degrees (also for limited-angle scans).
"""

from __future__ import annotations

import torch
from deepinv.physics import NoiseModel, Tomography

from klip_med.errors import expect
from klip_med.physics.base import KLIPPhysicsMixin
from klip_med.physics.noise import gaussian_noise, log_poisson_noise
from klip_med.physics.validate import (
    check_float,
    check_generator,
    check_image_size,
    check_int,
)

LOW_DOSE_DEFAULT_VIEWS = 180
LOW_DOSE_DEFAULT_MU_TIMES_SIZE = 2.0


class CTOperator(KLIPPhysicsMixin, Tomography):
    """deepinv ``Tomography`` (parallel beam, unnormalised) with klip_med's shape contract.

    ``A``: ``(B, 1, N, N)`` image -> ``(B, 1, D, V)`` line integrals. ``A_adjoint``: exact
    transpose (autograd). ``fbp`` / ``A_dagger(y, fbp=True)``: filtered back-projection.
    ``A_dagger(y)``: deepinv's iterative least squares.
    """

    def __init__(
        self,
        kind: str,
        image_size: int,
        angles_deg: torch.Tensor,
        noise_model: NoiseModel,
        parameters: dict,
        circle: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        expect(
            dtype in (torch.float32, torch.float64),
            "dtype",
            "torch.float32 or torch.float64",
            str(dtype),
        )
        Tomography.__init__(
            self,
            angles=angles_deg.to(device),
            img_width=image_size,
            circle=circle,
            adjoint_via_backprop=True,
            normalize=False,
            device=device,
            dtype=dtype,
            noise_model=noise_model,
        )
        self.img_size = (1, image_size, image_size)
        self._setup_contract(kind, image_size, image_size, {**parameters, "circle": circle})

    def _image_dtype(self) -> torch.dtype:
        return self.dtype

    def _required_dtype(self) -> torch.dtype:
        return self.dtype  # deepinv's Radon grids are built in this dtype

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Forward projection: ``(B, 1, N, N)`` -> ``(B, 1, D, V)`` line integrals."""
        self.check_image(x)
        return super().A(x, **kwargs)

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact adjoint (back-projection): ``(B, 1, D, V)`` -> ``(B, 1, N, N)``."""
        self.check_measurement_shape(y)
        return super().A_adjoint(y, **kwargs)

    def fbp(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Ramp-filtered back-projection: ``(B, 1, D, V)`` -> ``(B, 1, N, N)`` in image units."""
        self.check_measurement_shape(y)
        return super().fbp(y, **kwargs)

    def baseline(self, y: torch.Tensor) -> torch.Tensor:
        """Filtered back-projection of ``y``."""
        return self.fbp(y)


def _angles(range_deg: float, views: int) -> torch.Tensor:
    """``views`` angles uniformly over ``[0, range_deg)`` degrees (endpoint excluded)."""
    return torch.linspace(0.0, range_deg, views + 1, dtype=torch.float64)[:-1].to(torch.float32)


def sparse_view_ct(
    image_size: int,
    views: int,
    noise_sigma: float = 0.0,
    circle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CTOperator:
    """Sparse-view parallel-beam CT: ``views`` angles uniformly over [0, 180) degrees.

    Args:
        image_size: image side ``N`` in pixels (>= 8).
        views: number of projection angles (>= 1).
        noise_sigma: std of additive Gaussian noise on the sinogram, in line-integral units
            (intensity x pixels); 0 for noiseless.
        circle: restrict projection to the disc inscribed in the image (deepinv ``circle``).
        generator: optional torch.Generator for the noise (reproducible draws).
        device: torch device of the operator.
        dtype: float dtype of the Radon grids (float32; float64 for precise tests).
    """
    image_size = check_image_size(image_size)
    views = check_int("views", views, 1)
    generator = check_generator(generator, device)
    return CTOperator(
        "ct-sparse",
        image_size,
        _angles(180.0, views),
        gaussian_noise(noise_sigma, generator),
        {"views": views, "angular_range_deg": 180.0, "noise_sigma": float(noise_sigma)},
        circle=bool(circle),
        device=device,
        dtype=dtype,
    )


def limited_angle_ct(
    image_size: int,
    angular_range_deg: float,
    views: int | None = None,
    noise_sigma: float = 0.0,
    circle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CTOperator:
    """Limited-angle parallel-beam CT: angles uniformly over [0, ``angular_range_deg``) degrees.

    Args:
        image_size: image side ``N`` in pixels (>= 8).
        angular_range_deg: covered angular range in degrees, in (0, 180].
        views: number of angles; default one per degree, ``max(1, round(angular_range_deg))``.
        noise_sigma, circle, generator, device, dtype: as in :func:`sparse_view_ct`.
    """
    image_size = check_image_size(image_size)
    angular_range_deg = check_float(
        "angular_range_deg", angular_range_deg, low=0.0, high=180.0, low_open=True
    )
    if views is None:
        views = max(1, round(angular_range_deg))
    views = check_int("views", views, 1)
    generator = check_generator(generator, device)
    return CTOperator(
        "ct-limited",
        image_size,
        _angles(angular_range_deg, views),
        gaussian_noise(noise_sigma, generator),
        {"views": views, "angular_range_deg": angular_range_deg, "noise_sigma": float(noise_sigma)},
        circle=bool(circle),
        device=device,
        dtype=dtype,
    )


def low_dose_ct(
    image_size: int,
    i0: float,
    views: int = LOW_DOSE_DEFAULT_VIEWS,
    mu: float | None = None,
    noise_sigma: float = 0.0,
    circle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CTOperator:
    """Low-dose parallel-beam CT with photon-counting (log-Poisson) noise.

    The operator ``A`` is the same linear Radon transform as :func:`sparse_view_ct`; the noise
    model turns a clean line integral ``z = (A x)`` into the post-log measurement
    ``y = -log(N / i0) / mu`` with ``N ~ Poisson(i0 * exp(-mu * z))`` (zero counts -> 0.1 photon,
    see :class:`~klip_med.physics.noise.ClampedLogPoissonNoise`), so ``E[y] ~= A x`` at high dose
    and ``y`` stays in line-integral units.

    Units: ``mu`` is the attenuation (per pixel length) of one unit of image intensity, i.e. the
    transmitted fraction along a ray is ``exp(-mu * sum of intensities along the ray)``.
    The default ``mu = 2 / image_size`` makes a ray crossing a full-width object of intensity 1
    keep ``exp(-2) ~ 13.5%`` of its photons, which suits images scaled to [0, 1]; priors in
    [-1, 1] give negative "attenuation" in the background (counts above ``i0``), which the model
    tolerates but which is not physical.

    Args:
        image_size: image side ``N`` in pixels (>= 8).
        i0: unattenuated photons per detector bin (> 0); lower means noisier.
        views: number of angles over [0, 180) degrees. Default 180 (one per degree): low dose
            here means few photons, not few views, so angular sampling should not dominate the
            error for images up to ~128 px.
        mu: attenuation per unit line integral (> 0); default ``2 / image_size``.
        noise_sigma: optional extra Gaussian noise on the post-log data (line-integral units).
        circle, generator, device, dtype: as in :func:`sparse_view_ct` (one generator drives the
            Poisson and then the Gaussian draws).
    """
    image_size = check_image_size(image_size)
    i0 = check_float("i0", i0, low=0.0, low_open=True)
    views = check_int("views", views, 1)
    if mu is None:
        mu = LOW_DOSE_DEFAULT_MU_TIMES_SIZE / image_size
    mu = check_float("mu", mu, low=0.0, low_open=True)
    generator = check_generator(generator, device)
    return CTOperator(
        "ct-lowdose",
        image_size,
        _angles(180.0, views),
        log_poisson_noise(i0, mu, noise_sigma, generator),
        {
            "views": views,
            "angular_range_deg": 180.0,
            "i0": i0,
            "mu": mu,
            "noise_sigma": float(noise_sigma),
        },
        circle=bool(circle),
        device=device,
        dtype=dtype,
    )
