"""Measure a prior for its model card: denoising error, posterior-mean quality, sample figure.

- :func:`denoising_error`: MSE of the one-step denoised estimate ``x0_hat`` against the clean
  image at a few training timesteps (canonical noise level sigma), on held-out healthy slices.
- :func:`reconstruction_quality`: PSNR / SSIM (deepinv metrics, images mapped to [0, 1]) of the
  posterior mean of the fast sampler (DDS) against the measurement-domain baseline (zero-filled
  MRI / FBP CT) on the same slices and measurements.
- :func:`sample_figure`: unconditional samples (MONAI DDIM scheduler) next to real slices.

Everything runs on the device given; randomness through one ``torch.Generator``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from klip_med._atomic import atomic_path
from klip_med.data.manifest import Manifest
from klip_med.errors import KLIPMedError
from klip_med.priors.diffusion import DiffusionPrior

DEFAULT_TIMESTEPS = (50, 200, 500, 800)


def heldout_healthy_slices(manifest: Manifest, prior: DiffusionPrior, n_slices: int,
                           min_body_fraction: float = 0.3) -> tuple[Tensor, list[str]]:
    """``n_slices`` held-out (dev + test) lesion-free slices with enough anatomy, in prior units.

    Slices are taken evenly spaced through the held-out list (deterministic). MR volumes are
    scaled by the prior's rule over the whole file; CT through the HU window.

    Returns:
        images: (n, 1, H, W) float32 in [-1, 1]; names: ``file[slice]`` for each.
    """
    rule = prior.config.intensity
    candidates: list[tuple[np.ndarray, str]] = []
    for item in manifest.split("dev") + manifest.split("test"):
        with np.load(item.path) as data:
            volume = data[manifest.array_key].astype(np.float32)
            masks = data[manifest.mask_key] if manifest.mask_key else None
        model = rule.to_model(volume, rule.mr_scale(volume) if rule.kind == "mr-percentile" else None)
        for i in item.slice_indices(volume.shape[0]):
            if masks is not None and masks[i].any():
                continue
            if (model[i] > -0.9).mean() < min_body_fraction:
                continue
            candidates.append((model[i], f"{item.relative}[{i}]"))
    if len(candidates) < n_slices:
        raise KLIPMedError(
            f"{manifest.source}: expected >= {n_slices} held-out healthy slices, found {len(candidates)}"
        )
    picks = np.linspace(0, len(candidates) - 1, n_slices).round().astype(int)
    images = torch.from_numpy(np.stack([candidates[i][0] for i in picks])[:, None].copy())
    return images, [candidates[i][1] for i in picks]


@torch.no_grad()
def denoising_error(prior: DiffusionPrior, images: Tensor, generator: torch.Generator,
                    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS) -> list[dict]:
    """MSE of ``x0_hat = (x_t - sqrt(1-a) eps_hat) / sqrt(a)`` vs the clean image, per timestep.

    Args:
        images: (N, 1, H, W) clean images in [-1, 1].
    Returns:
        one dict per timestep: ``t``, ``sigma`` (canonical noise level, [-1, 1] units),
        ``x0_mse`` (mean over pixels and images), ``eps_mse``.
    """
    dev = prior.device
    rows = []
    for t in timesteps:
        a = float(prior.alphas_cumprod[t])
        x0 = images.to(dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev)
        x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
        eps_hat = torch.cat([prior.eps(chunk, torch.full((chunk.shape[0],), float(t), device=dev))
                             for chunk in x_t.split(16)])
        x0_hat = (x_t - (1 - a) ** 0.5 * eps_hat) / a**0.5
        rows.append({"t": t, "sigma": round(((1 - a) / a) ** 0.5, 4),
                     "x0_mse": float(((x0_hat - x0) ** 2).mean()),
                     "eps_mse": float(((eps_hat - noise) ** 2).mean())})
    return rows


def _to_unit(x: Tensor) -> Tensor:
    return ((x.clamp(-1, 1) + 1) / 2).float()


def reconstruction_quality(prior: DiffusionPrior, images: Tensor, physics_spec: str, generator: torch.Generator,
                           n_samples: int = 4, n_steps: int = 50) -> dict:
    """Posterior mean (DDS sampler) vs baseline reconstruction, PSNR / SSIM on [0, 1] images.

    Args:
        images: (N, 1, H, W) ground truth in [-1, 1]; each is measured by the operator of
            ``physics_spec`` (e.g. ``"mri:accel=4,center=0.08,noise=0.01"``) with its noise.
    Returns:
        per-image and mean PSNR (dB) / SSIM of the posterior mean and of the baseline, seconds.
    """
    from deepinv.loss.metric import PSNR, SSIM

    from klip_med.physics import baseline_reconstruction, parse_physics
    from klip_med.sampling import DDSSampler

    dev = prior.device
    size = images.shape[-1]
    psnr, ssim = PSNR(max_pixel=1.0), SSIM(max_pixel=1.0)
    sampler = DDSSampler(prior, n_steps=n_steps)
    rows = []
    start = time.perf_counter()
    for k in range(images.shape[0]):
        physics = parse_physics(physics_spec, size, generator=generator, device=dev)
        truth = images[k: k + 1].to(dev)
        y = physics(truth)
        baseline = baseline_reconstruction(physics, y)
        result = sampler.sample(y, physics, n_samples, tuple(images.shape[1:]), generator)
        mean = result.mean.reshape(1, *images.shape[1:])
        t, b, m = _to_unit(truth), _to_unit(baseline), _to_unit(mean)
        rows.append({"psnr_posterior_mean": float(psnr(m, t)), "psnr_baseline": float(psnr(b, t)),
                     "ssim_posterior_mean": float(ssim(m, t)), "ssim_baseline": float(ssim(b, t))})
    seconds = time.perf_counter() - start
    means = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    return {"physics": physics_spec, "sampler": f"dds(steps={n_steps}, eta=0.85, gamma=1, cg=5)",
            "samples": n_samples, "n_images": len(rows), **means, "per_image": rows,
            "seconds": round(seconds, 1)}


@torch.no_grad()
def unconditional_samples(prior: DiffusionPrior, n: int, generator: torch.Generator, n_steps: int = 100,
                          eta: float = 1.0) -> Tensor:
    """``n`` samples from the prior with MONAI's DDIM scheduler, (n, 1, H, W) in [-1, 1].

    ``eta = 1`` (ancestral noise, DDPM-like) by default: the shipped priors' deterministic DDIM
    (``eta = 0``) samples keep high-frequency noise, a sign of an imprecise noise prediction at
    low noise levels (the priors are not trained to convergence; see their model cards).
    """
    from monai.networks.schedulers import DDIMScheduler

    sched_cfg = prior.config.schedule
    scheduler = DDIMScheduler(num_train_timesteps=sched_cfg["num_train_timesteps"], schedule=sched_cfg["schedule"],
                              beta_start=sched_cfg["beta_start"], beta_end=sched_cfg["beta_end"], clip_sample=True)
    scheduler.set_timesteps(n_steps)
    dev = prior.device
    x = torch.randn((n, *prior.image_shape), generator=generator, device=dev)
    for t in scheduler.timesteps:
        eps = prior.eps(x, torch.full((n,), float(t), device=dev))
        x, _ = scheduler.step(eps, int(t), x, eta=eta, generator=generator)
    return x.clamp(-1, 1)


def sample_figure(prior: DiffusionPrior, real: Tensor, path: str | Path, generator: torch.Generator,
                  n: int = 8, n_steps: int = 100) -> Path:
    """PNG: a row of real held-out slices above a row of unconditional samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = unconditional_samples(prior, n, generator, n_steps).cpu()
    real = real[:n].cpu()
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.5))
    for j in range(n):
        for row, (stack, label) in enumerate([(real, "held-out"), (samples, "sample")]):
            ax = axes[row, j]
            if j < stack.shape[0]:
                ax.imshow(stack[j, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label)
    fig.suptitle(f"{prior.config.name}: real held-out slices (top), prior samples (bottom, DDIM eta=1, "
                 f"{n_steps} steps)",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
