"""Baseline maps that call the prior again on a reconstruction (no sampling run needed): AnoDDPM's
re-noise-and-denoise error, EigenScore's posterior covariance, MONAI's per-timestep likelihood terms.

Each takes the reconstruction (H, W) in prior units and a ``torch.Generator`` and returns a per-pixel
map (H, W), higher = more anomalous (see the table in :mod:`klip_med.eval.baselines`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from klip_med.errors import KLIPMedError, expect
from klip_med.sampling.schedule import VPSchedule
from klip_med.score.windows import timestep_at


def as_image(x: Tensor, name: str) -> Tensor:
    """(H, W), (1, H, W) or (1, 1, H, W) -> (1, 1, H, W) float32."""
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 1:
        raise KLIPMedError(f"{name}: expected one single-channel image (H, W), found shape {tuple(x.shape)}")
    return x.to(torch.float32)



def _timestep(frac: float, schedule: VPSchedule) -> int:
    return int(round(timestep_at(frac, schedule.num_train_timesteps)))


def _eps(prior, x: Tensor, t: int) -> Tensor:
    with torch.no_grad():
        return prior.eps(x, torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device))


def ddim_denoise(prior, x_t: Tensor, t_start: int, steps: int,
                 clip: tuple[float, float] | None = (-1.0, 1.0)) -> tuple[Tensor, list[int]]:
    """Deterministic DDIM (eta = 0) from training timestep ``t_start`` to the clean end.

    Args:
        x_t: (B, C, H, W) noisy images at ``t_start``.
        steps: network calls (timesteps evenly spaced from ``t_start`` to 0; 1 = Tweedie's estimate).
        clip: range the denoised estimate is clipped to at every step (None: no clipping).

    Returns:
        the final denoised estimate (B, C, H, W) and the timesteps used.
    """
    schedule = VPSchedule(prior.alphas_cumprod)
    ts = sorted({int(round(v)) for v in np.linspace(t_start, 0, max(steps, 1))}, reverse=True)
    x = x_t
    x0 = x_t
    for k, t in enumerate(ts):
        a = schedule.alpha_bar(t)
        eps = _eps(prior, x, t)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip is not None:
            x0 = x0.clamp(*clip)
        if k + 1 < len(ts):
            a_next = schedule.alpha_bar(ts[k + 1])
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return x0, ts


def anoddpm_map(prior, x_mean: Tensor, generator: torch.Generator, t_frac: float = 0.25,
                steps: int = 5) -> tuple[Tensor, int, list[int]]:
    """AnoDDPM-style reconstruction error of the posterior mean, (H, W).

    ``x_t = sqrt(a_t) x_mean + sqrt(1 - a_t) z`` at ``t = round(t_frac (T - 1))``, denoised by the
    prior alone (:func:`ddim_denoise`), error ``|x_mean - x_hat|``. Gaussian noise, one draw.

    Returns:
        (map, network forwards, timesteps used).
    """
    schedule = VPSchedule(prior.alphas_cumprod)
    t = _timestep(t_frac, schedule)
    x = as_image(x_mean, "x_mean").to(prior_device(prior))
    a = schedule.alpha_bar(t)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    x_hat, ts = ddim_denoise(prior, math.sqrt(a) * x + math.sqrt(1 - a) * z, t, steps)
    return (x - x_hat).abs().reshape(x.shape[-2:]), len(ts), ts


def eigenscore(prior, x_mean: Tensor, generator: torch.Generator, levels: Sequence[float] = (0.1, 0.25, 0.5),
               rank: int = 4, iterations: int = 3, fd: float = 0.01) -> tuple[Tensor, float, int, dict]:
    """Leading eigenpairs of the denoiser's posterior covariance around the posterior mean.

    In the variance-exploding view ``u = x_t / sqrt(a_t) = x0 + sigma z``, Tweedie gives
    ``Cov[x0 | u] = sigma^2 dD/du`` with ``D(u)`` the denoised estimate. Its leading eigenpairs
    come from subspace iteration on products ``Cov v ~ sigma^2 (D(u + h v) - D(u)) / h``
    (forward passes only; ``h`` makes the perturbation's per-pixel RMS ``fd * sigma``), the last
    iteration a Rayleigh-Ritz step on the symmetrised projected matrix. Eigenvalues are reported
    relative to ``sigma^2`` (in [0, 1] for an exact denoiser, comparable across levels).

    Args:
        x_mean: (H, W) the reconstruction, prior units.
        levels: normalised times t / (T - 1) of the noise levels.
        rank, iterations, fd: see :class:`BaselineSettings`.

    Returns:
        ``(map, score, nfe, info)``: map (H, W) = mean over levels of
        ``sum_j max(lambda_j, 0) / sigma^2 * v_j(i)^2``; score = mean over levels of the top
        ``lambda_1 / sigma^2``; nfe = forward passes on one image; info = eigenvalues per level.
    """
    schedule = VPSchedule(prior.alphas_cumprod)
    x = as_image(x_mean, "x_mean").to(prior_device(prior))
    shape = x.shape[1:]
    n = x.numel()
    if rank > n:
        raise KLIPMedError(f"eigen_rank: expected at most the number of pixels {n}, found {rank}")
    total = torch.zeros(shape[-2:], dtype=torch.float32, device=x.device)
    tops, per_level, nfe = [], [], 0
    for frac in levels:
        t = _timestep(frac, schedule)
        a = schedule.alpha_bar(t)
        sigma = math.sqrt((1 - a) / a)
        u = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)

        def denoise(batch: Tensor, t=t, a=a, sigma=sigma) -> Tensor:
            return batch - sigma * _eps(prior, math.sqrt(a) * batch, t)

        d0 = denoise(u)
        nfe += 1
        start = torch.randn((n, rank), generator=generator, device=x.device, dtype=torch.float32)
        v = torch.linalg.qr(start).Q
        h = fd * sigma * math.sqrt(n)
        evals = torch.zeros(rank, device=x.device)
        for it in range(iterations):
            probes = u + h * v.T.reshape(rank, *shape)
            cov_v = (sigma**2) * ((denoise(probes) - d0) / h).reshape(rank, n).T  # (n, rank)
            nfe += rank
            if it + 1 < iterations:
                v = torch.linalg.qr(cov_v).Q
                continue
            small = v.T @ cov_v
            evals, rot = torch.linalg.eigh(0.5 * (small + small.T))
            order = torch.argsort(evals, descending=True)
            evals, v = evals[order], v @ rot[:, order]
        rel = (evals / sigma**2).clamp_min(0.0)
        total += (v.square() * rel).sum(dim=1).reshape(shape[-2:])
        tops.append(float(rel[0]))
        per_level.append({"t": t, "sigma": round(sigma, 5), "eigenvalues_over_sigma2": [float(e) for e in evals / sigma**2]})
    return total / len(levels), float(np.mean(tops)), nfe, {"levels": per_level}


def prior_device(prior) -> torch.device:
    dev = getattr(prior, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return prior.alphas_cumprod.device if isinstance(prior.alphas_cumprod, Tensor) else torch.device("cpu")


def scheduler_of(prior):
    """The MONAI ``DDPMScheduler`` of a prior: its config's, or (a prior without one, e.g. the Gaussian
    case) the default linear-beta scheduler when its ``alphas_cumprod`` equal the prior's."""
    from monai.networks.schedulers import DDPMScheduler

    config = getattr(prior, "config", None)
    if config is not None and hasattr(config, "schedule"):
        from klip_med.priors.diffusion import build_scheduler

        return build_scheduler(config)
    abar = torch.as_tensor(prior.alphas_cumprod, dtype=torch.float64).cpu()
    scheduler = DDPMScheduler(num_train_timesteps=int(abar.numel()))
    same = torch.allclose(scheduler.alphas_cumprod.to(torch.float64), abar, rtol=1e-5, atol=1e-7)
    expect(same, "prior", "a MONAI DDPM schedule (a config, or the default linear-beta alphas_cumprod)",
           "another schedule")
    return scheduler


def monai_likelihood_map(prior, x_mean: Tensor, generator: torch.Generator, n_timesteps: int = 25) -> tuple[Tensor, int, dict]:
    """MONAI ``DiffusionInferer.get_likelihood``'s per-timestep KL maps of the reconstruction,
    averaged over ``n_timesteps`` training timesteps evenly spaced over [1, T - 1]
    (:func:`klip_med.eval.monai_likelihood.likelihood_kl_maps`, one noise draw shared by all).

    The map is the mean KL term per pixel (nats); times ``T - 1`` it estimates the pixel's share of
    the variational bound's KL terms (MONAI's ``total_kl`` without the ``t = 0`` decoder term).

    Returns:
        ``(map, nfe, info)`` with info = the timesteps and the image's bound estimate (nats per pixel).
    """
    from klip_med.eval.monai_likelihood import likelihood_kl_maps

    scheduler = scheduler_of(prior)
    T = int(scheduler.num_train_timesteps)
    expect(isinstance(n_timesteps, int) and 1 <= n_timesteps <= T - 1, "monai_timesteps",
           f"an integer in [1, {T - 1}]", n_timesteps)
    ts = sorted({int(v) for v in np.linspace(1, T - 1, n_timesteps).round()})
    x = as_image(x_mean, "x_mean").to(prior_device(prior))
    maps = likelihood_kl_maps(lambda xt, t: prior.eps(xt, t.float()), scheduler, x, generator, ts)
    m = maps.maps.mean(dim=0).reshape(x.shape[-2:])
    return m, len(ts), {"timesteps": [ts[0], ts[-1], len(ts)],
                        "bound_kl_nats_per_pixel": round(float(m.mean()) * (T - 1), 4)}
