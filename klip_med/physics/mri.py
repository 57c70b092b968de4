"""Cartesian MRI operators over :class:`deepinv.physics.MRI` / :class:`~deepinv.physics.MultiCoilMRI`.

Conventions:

* Images are real ``(B, 1, H, W)`` tensors (magnitude-like, in the prior's range).
  deepinv MRI works on complex images stored as 2 channels (real, imag); the
  :class:`RealImageOperator` wrapper embeds real images as ``(x, 0)`` and returns the real part
  of the adjoint, which is the exact adjoint under the real inner product of the (real, imag)
  measurement channels.
* k-space uses deepinv's centred **orthonormal** FFT: a fully sampled single-coil acquisition is
  unitary, so ``A_adjoint(A x) = x`` and a Gaussian ``noise_sigma`` in k-space gives the same
  sigma per pixel (per real/imag channel) in the zero-filled image.
* Masks are 1D Cartesian: whole columns (index along W, the phase-encode direction) are sampled,
  identical for every row. ``floor(W / acceleration)`` columns are sampled in total, of which
  ``int(center_fraction * W)`` form a contiguous fully sampled band around column ``W // 2``
  (deepinv's mask generators).
* Measurements are ``(B, 2, H, W)`` (single coil) or ``(B, 2, N_coils, H, W)`` (multi-coil),
  zero outside the mask.
"""

from __future__ import annotations

import torch
from deepinv.physics import MRI, LinearPhysics, MultiCoilMRI, NoiseModel
from deepinv.physics.generator import (
    EquispacedMaskGenerator,
    GaussianMaskGenerator,
    RandomMaskGenerator,
)

from klip_med.errors import expect
from klip_med.physics.base import KLIPPhysicsMixin
from klip_med.physics.noise import gaussian_noise
from klip_med.physics.validate import (
    check_float,
    check_generator,
    check_image_size,
)

MASK_GENERATORS = {
    "equispaced": EquispacedMaskGenerator,
    "gaussian": GaussianMaskGenerator,
    "random": RandomMaskGenerator,
}
DEFAULT_MASK_SEED = 0


class RealImageOperator(KLIPPhysicsMixin, LinearPhysics):
    """Real-image view of a complex deepinv MRI operator (single- or multi-coil).

    ``A(x) = inner.A(cat(x, 0))`` and ``A_adjoint(y) = inner.A_adjoint(y)[:, :1]`` (real part).
    Noise is delegated to ``inner.noise`` (deepinv masks it, so unsampled k-space stays zero),
    using this operator's ``noise_model``. ``A_dagger`` / ``prox_l2`` are deepinv's iterative
    least-squares solvers on the real operator.

    Args:
        kind: ``"mri"`` or ``"mri-multicoil"``.
        inner: the deepinv ``MRI`` or ``MultiCoilMRI`` (mask and coil maps fixed).
        height, width: image size in pixels.
        noise_model: measurement noise (k-space units).
        parameters: JSON-ready construction parameters for :meth:`describe`.
        device: torch device.
    """

    def __init__(
        self,
        kind: str,
        inner: MRI | MultiCoilMRI,
        height: int,
        width: int,
        noise_model: NoiseModel,
        parameters: dict,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(img_size=(1, height, width), noise_model=noise_model, device=device)
        self.inner = inner.to(device)
        if isinstance(inner, MultiCoilMRI):
            sensitivity = inner.coil_maps.abs().pow(2).sum(dim=1, keepdim=True)  # (1, 1, H, W)
        else:
            sensitivity = torch.ones(1, 1, height, width, device=device)
        self.register_buffer("sensitivity", sensitivity.to(torch.float32))
        self._setup_contract(kind, height, width, parameters)

    @property
    def mask(self) -> torch.Tensor:
        """Sampling mask, ``(H, W)`` float with values in {0, 1} (columns = phase-encode lines)."""
        return self.inner.mask[0, 0]

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Real image ``(B, 1, H, W)`` -> masked k-space ``(B, 2, [coils,] H, W)``."""
        self.check_image(x)
        return self.inner.A(torch.cat([x, torch.zeros_like(x)], dim=1))

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """k-space ``(B, 2, [coils,] H, W)`` -> real part of the complex adjoint, ``(B, 1, H, W)``."""
        self.check_measurement_shape(y)
        return self.inner.A_adjoint(y)[:, :1]

    def noise(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Add ``noise_model`` noise on the sampled k-space locations only (deepinv's ``noise``)."""
        self.inner.noise_model = self.noise_model
        return self.inner.noise(y, **kwargs)

    def zero_filled(self, y: torch.Tensor) -> torch.Tensor:
        """Zero-filled reconstruction, ``(B, 1, H, W)``.

        ``Re(A^H y) / sum_c |s_c|^2`` (the denominator is 1 for single coil; pixels without coil
        sensitivity give 0), so a fully sampled noiseless acquisition returns the image exactly.
        """
        x = self.A_adjoint(y)
        sens = self.sensitivity.to(x.dtype)
        covered = sens > 1e-6 * sens.max()
        return torch.where(covered, x / torch.where(covered, sens, torch.ones_like(sens)), torch.zeros_like(x))

    def baseline(self, y: torch.Tensor) -> torch.Tensor:
        """Zero-filled reconstruction of ``y`` (see :meth:`zero_filled`)."""
        return self.zero_filled(y)


def cartesian_mask(
    image_size: int | tuple[int, int],
    acceleration: float,
    center_fraction: float = 0.08,
    mask_kind: str = "random",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """1D Cartesian column mask from deepinv's mask generators.

    Args:
        image_size: ``N`` (square) or ``(H, W)`` in pixels (each >= 8).
        acceleration: in [1, W]; ``floor(W / acceleration)`` columns are sampled in total.
        center_fraction: in [0, 1); ``int(center_fraction * W)`` centre columns are always
            sampled (0: no centre band). Must leave at least one non-centre line unless fully
            sampled.
        mask_kind: ``"random"`` (uniform), ``"gaussian"`` (variable density) or ``"equispaced"``
            (regular spacing, random offset).
        generator: torch.Generator for the random draws; ``None`` uses a fresh CPU generator
            seeded with 0 (deterministic, never torch's global RNG).

    Returns:
        float32 ``(H, W)`` tensor of 0/1 on the generator's device, constant along H.
    """
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        height = width = check_image_size(image_size)
    else:
        expect(
            isinstance(image_size, (tuple, list)) and len(image_size) == 2,
            "image_size",
            "an int or an (H, W) pair",
            image_size,
        )
        height = check_image_size(image_size[0])
        width = check_image_size(image_size[1])
    acceleration = check_float("acceleration", acceleration, low=1.0, high=float(width))
    center_fraction = check_float("center_fraction", center_fraction, low=0.0, high=1.0, high_open=True)
    expect(mask_kind in MASK_GENERATORS, "mask_kind", f"one of {', '.join(sorted(MASK_GENERATORS))}", repr(mask_kind))
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(DEFAULT_MASK_SEED)
    expect(isinstance(generator, torch.Generator), "generator", "a torch.Generator or None", type(generator).__name__)

    n_total = int(width // acceleration)
    n_center = int(center_fraction * width)
    if n_total < width:
        expect(
            n_center < n_total,
            "center_fraction",
            f"fewer centre lines (int(center_fraction * {width})) than the {n_total} lines sampled "
            f"at acceleration {acceleration:g}",
            f"{center_fraction:g} -> {n_center} centre lines",
        )
    mask_generator = MASK_GENERATORS[mask_kind](
        (height, width),
        acceleration=acceleration,
        center_fraction=center_fraction,
        rng=generator,
        device=generator.device,
    )
    return mask_generator.step(batch_size=1)["mask"][0, 0].to(torch.float32)


def _mask_parameters(mask: torch.Tensor, acceleration: float, center_fraction: float, mask_kind: str) -> dict:
    width = mask.shape[-1]
    lines = int(mask[0].sum().item())
    return {
        "acceleration": acceleration,
        "center_fraction": center_fraction,
        "mask_kind": mask_kind,
        "sampled_lines": lines,
        "center_lines": int(center_fraction * width),
        "effective_acceleration": width / lines,
    }


def cartesian_mri(
    image_size: int,
    acceleration: float,
    center_fraction: float = 0.08,
    mask_kind: str = "random",
    noise_sigma: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> RealImageOperator:
    """Single-coil Cartesian MRI for real ``(B, 1, N, N)`` images.

    Args:
        image_size: image side ``N`` in pixels (>= 8).
        acceleration, center_fraction, mask_kind: see :func:`cartesian_mask`.
        noise_sigma: std of complex Gaussian noise per real/imag k-space channel (orthonormal FFT
            units = image units), added on sampled locations only.
        generator: one torch.Generator for the mask draw and then the noise draws; ``None``: mask
            from seed 0, noise from torch's default generator.
        device: torch device.
    """
    image_size = check_image_size(image_size)
    generator = check_generator(generator, device)
    mask = cartesian_mask(image_size, acceleration, center_fraction, mask_kind, generator).to(device)
    noise_model = gaussian_noise(noise_sigma, generator)
    inner = MRI(mask=mask, img_size=(image_size, image_size), device=device)
    params = _mask_parameters(mask, float(acceleration), float(center_fraction), mask_kind)
    params.update({"coils": 1, "noise_sigma": float(noise_sigma)})
    return RealImageOperator("mri", inner, image_size, image_size, noise_model, params, device=device)


def _check_coil_maps(coil_maps: object, image_size: int | None) -> torch.Tensor:
    expect(isinstance(coil_maps, torch.Tensor), "coil_maps", "a complex torch.Tensor (N_coils, H, W)", type(coil_maps).__name__)
    expect(coil_maps.is_complex(), "coil_maps", "a complex tensor (N_coils, H, W)", f"dtype {coil_maps.dtype}")
    expect(coil_maps.dim() == 3, "coil_maps", "shape (N_coils, H, W)", tuple(coil_maps.shape))
    n_coils, height, width = coil_maps.shape
    expect(n_coils >= 1, "coil_maps", "at least one coil", tuple(coil_maps.shape))
    if image_size is not None:
        image_size = check_image_size(image_size)
        expect(
            (height, width) == (image_size, image_size),
            "coil_maps",
            f"shape (N_coils, {image_size}, {image_size}) matching image_size",
            tuple(coil_maps.shape),
        )
    else:
        check_image_size(height)
        check_image_size(width)
    expect(bool(torch.isfinite(torch.view_as_real(coil_maps)).all()), "coil_maps", "finite values", "NaN or Inf")
    expect(bool(coil_maps.abs().sum() > 0), "coil_maps", "non-zero sensitivities", "all zeros")
    return coil_maps


def multicoil_mri(
    coil_maps: torch.Tensor,
    acceleration: float,
    center_fraction: float = 0.08,
    mask_kind: str = "random",
    noise_sigma: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    image_size: int | None = None,
) -> RealImageOperator:
    """Multi-coil Cartesian MRI (SENSE model) for real ``(B, 1, H, W)`` images.

    ``y_c = M F (s_c * x)`` for each coil ``c``; measurements ``(B, 2, N_coils, H, W)``.

    Args:
        coil_maps: complex sensitivities ``(N_coils, H, W)``; not normalised here (the
            zero-filled baseline divides by ``sum_c |s_c|^2``).
        acceleration, center_fraction, mask_kind: see :func:`cartesian_mask` (one mask shared by
            all coils).
        noise_sigma, generator, device: as in :func:`cartesian_mri`.
        image_size: if given, ``coil_maps`` must be ``(N_coils, image_size, image_size)``.
    """
    coil_maps = _check_coil_maps(coil_maps, image_size)
    n_coils, height, width = coil_maps.shape
    generator = check_generator(generator, device)
    mask = cartesian_mask((height, width), acceleration, center_fraction, mask_kind, generator).to(device)
    noise_model = gaussian_noise(noise_sigma, generator)
    inner = MultiCoilMRI(mask=mask, coil_maps=coil_maps.to(device), img_size=(height, width), device=device)
    params = _mask_parameters(mask, float(acceleration), float(center_fraction), mask_kind)
    params.update({"coils": int(n_coils), "noise_sigma": float(noise_sigma)})
    return RealImageOperator("mri-multicoil", inner, height, width, noise_model, params, device=device)
