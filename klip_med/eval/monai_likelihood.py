"""MONAI's diffusion likelihood maps (``DiffusionInferer.get_likelihood``) as one pure function.

MONAI's inferer scores an image under a DDPM prior by the terms of its variational bound: for each
training timestep ``t`` it noises the image once (one noise draw shared by all ``t``), asks the
network for the reverse step's mean, and takes the KL between the true reverse kernel
``q(x_{t-1} | x_t, x_0)`` and the model's ``p(x_{t-1} | x_t)``, per pixel; at ``t = 0`` the term is
the discretised-Gaussian decoder's negative log-likelihood. With ``save_intermediates=True`` it
returns those per-timestep maps. :func:`likelihood_kl_maps` computes the same maps (the same
formulas, the scheduler's float32 constants), but

- draws its noise from a ``torch.Generator`` (MONAI's uses torch's global generator);
- takes any ``model(x_t, t)`` (a klip_med prior's ``eps``, or ``lambda x, t: unet(x, timesteps=t)``);
- evaluates only the timesteps asked for (MONAI: all of ``scheduler.timesteps``);
- changes nothing it is given (MONAI's ``add_noise`` recasts the scheduler's tensors).

With the same noise its maps equal MONAI's (a test runs MONAI's own ``get_likelihood`` on a small
model and compares). Units: nats per pixel for ``t > 0``; the ``t = 0`` decoder term is nats per
pixel of the discretised likelihood with ``original_input_range`` / ``scaled_input_range`` setting
the bin width, as in MONAI.

It is a per-timestep likelihood of an *image* under the prior (a baseline OOD map of, e.g., a
reconstruction), not a KL between sampling paths: KLIP's per-step KL compares the posterior's and
the prior's steps on the posterior's path; these compare the true and the prior's reverse kernels
on the forward-noised image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from klip_med.errors import expect


@dataclass(frozen=True)
class LikelihoodMaps:
    """Per-timestep KL maps of :func:`likelihood_kl_maps`.

    Attributes:
        maps: (n_timesteps, B, C, H, W) float32, nats per pixel, in the order of ``timesteps``.
        timesteps: the training timesteps evaluated.
    """

    maps: Tensor
    timesteps: tuple[int, ...]

    @property
    def total(self) -> Tensor:
        """MONAI's ``total_kl``: per image, the sum over the evaluated timesteps of the pixel-mean term, (B,)."""
        return self.maps.flatten(2).mean(dim=2).sum(dim=0)

    def pixel_sum(self, t_min: int = 0, t_max: int | None = None) -> Tensor:
        """Per-pixel sum over evaluated timesteps in ``[t_min, t_max]``, (B, C, H, W)."""
        t_max = max(self.timesteps) if t_max is None else t_max
        keep = [i for i, t in enumerate(self.timesteps) if t_min <= t <= t_max]
        expect(bool(keep), "t_min / t_max", f"a range holding evaluated timesteps {self.timesteps[:3]}...",
               (t_min, t_max))
        return self.maps[keep].sum(dim=0)


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _decoder_nll(x0: Tensor, means: Tensor, log_scales: Tensor, bin_width: float) -> Tensor:
    """Negative log-likelihood of the discretised Gaussian decoder (improved-diffusion; MONAI's formula)."""
    centred = x0 - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centred + bin_width / 2))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centred - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x0 < -0.999, log_cdf_plus, torch.where(x0 > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs


def likelihood_kl_maps(
    model: Callable[[Tensor, Tensor], Tensor],
    scheduler,
    images: Tensor,
    generator: torch.Generator,
    timesteps: Sequence[int] | None = None,
    original_input_range: tuple[float, float] = (0, 255),
    scaled_input_range: tuple[float, float] = (0, 1),
) -> LikelihoodMaps:
    """Per-timestep variational-bound KL maps of ``images`` under a DDPM prior (MONAI's get_likelihood).

    Args:
        model: ``model(x_t (B, C, H, W), t (B,) long) -> epsilon`` (or ``sample`` / ``v_prediction``,
            as the scheduler's ``prediction_type`` says); learned variances are not supported.
        scheduler: a MONAI ``DDPMScheduler`` (its schedule, prediction type, clipping, variance type).
        images: (B, C, H, W) in the model's range ([-1, 1] for klip_med priors); not modified.
        generator: draws the one noise image shared by all timesteps (``randn`` of ``images``' shape).
        timesteps: training timesteps to evaluate, any order; default all, ``T - 1`` down to 0.
        original_input_range, scaled_input_range: the decoder's bin width at ``t = 0``, as in MONAI.

    Returns:
        :class:`LikelihoodMaps`; ``maps[i]`` is the KL term of ``timesteps[i]``, nats per pixel.

    Raises:
        KLIPMedError: not a DDPMScheduler, a learned-variance scheduler, a timestep out of range, images
            not (B, C, H, W) finite, or a model output of the wrong shape.
    """
    expect(type(scheduler).__name__ == "DDPMScheduler", "scheduler", "a MONAI DDPMScheduler (as get_likelihood)",
           type(scheduler).__name__)
    expect(scheduler.variance_type in ("fixed_small", "fixed_large"), "scheduler.variance_type",
           "'fixed_small' or 'fixed_large' (learned variances are not supported)", scheduler.variance_type)
    expect(isinstance(images, Tensor) and images.ndim == 4, "images", "a (B, C, H, W) tensor",
           tuple(getattr(images, "shape", ())))
    expect(bool(torch.isfinite(images).all()), "images", "finite values", "NaN or inf")
    expect(isinstance(generator, torch.Generator), "generator", "a torch.Generator", type(generator).__name__)
    T = int(scheduler.num_train_timesteps)
    steps = tuple(range(T - 1, -1, -1)) if timesteps is None else tuple(int(t) for t in timesteps)
    expect(bool(steps) and all(0 <= t < T for t in steps), "timesteps", f"integers in [0, {T - 1}]",
           list(steps)[:8])
    bin_width = (scaled_input_range[1] - scaled_input_range[0]) / (original_input_range[1] - original_input_range[0])
    device, dtype = images.device, images.dtype
    betas = scheduler.betas.to(device=device, dtype=dtype)
    alphas = scheduler.alphas.to(device=device, dtype=dtype)
    abar = scheduler.alphas_cumprod.to(device=device, dtype=dtype)
    one = torch.ones((), device=device, dtype=dtype)
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=dtype)
    maps = []
    for t in steps:
        a_t, a_prev = abar[t], (abar[t - 1] if t > 0 else one)
        x_t = a_t.sqrt() * images + (1 - a_t).sqrt() * noise
        with torch.no_grad():
            out = model(x_t, torch.full((images.shape[0],), t, device=device, dtype=torch.long))
        expect(tuple(out.shape) == tuple(images.shape), "model output",
               f"shape {tuple(images.shape)} (learned variances are not supported)", tuple(out.shape))
        if scheduler.prediction_type == "epsilon":
            x0_hat = (x_t - (1 - a_t).sqrt() * out) / a_t.sqrt()
        elif scheduler.prediction_type == "sample":
            x0_hat = out
        else:  # v_prediction
            x0_hat = a_t.sqrt() * x_t - (1 - a_t).sqrt() * out
        if scheduler.clip_sample:
            x0_hat = x0_hat.clamp(-1, 1)
        c0, ct = a_prev.sqrt() * betas[t] / (1 - a_t), alphas[t].sqrt() * (1 - a_prev) / (1 - a_t)
        predicted_mean = c0 * x0_hat + ct * x_t
        if scheduler.variance_type == "fixed_large":
            variance = betas[t]
        else:
            variance = ((1 - a_prev) / (1 - a_t) * betas[t]).clamp(min=1e-20)
        if t == 0:
            kl = _decoder_nll(images, predicted_mean, 0.5 * torch.log(variance), bin_width)
        else:  # KL of two Gaussians with the same variance: MONAI's formula with equal log-variances
            posterior_mean = c0 * images + ct * x_t
            kl = 0.5 * (posterior_mean - predicted_mean) ** 2 / variance
        maps.append(kl.to(torch.float32))
    return LikelihoodMaps(maps=torch.stack(maps), timesteps=steps)
