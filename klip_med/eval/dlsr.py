"""DLSR baseline: layer-wise semantic reconstruction in the prior's own feature space.

After Yang et al., "Diffusion-based Layer-wise Semantic Reconstruction for Unsupervised
Out-of-Distribution Detection" (NeurIPS 2024): multi-layer features of an image are noised and
reconstructed by a small diffusion model trained on in-distribution (ID) features only; features
the model has not learnt reconstruct badly. Here the feature extractor is the prior's own UNet and
the score is kept per location, so it is a map:

- Features: :func:`klip_med.eval.features.unet_features` (``down_blocks[1]``, ``down_blocks[2]``,
  ``middle_block`` at t/(T-1) = ``t_frac``; for the shipped 128 x 128 priors 64 + 128 + 128 = 320
  values at 32 x 32 locations, one per 4 x 4 pixels), each channel standardised by its mean and
  std over the ID training locations.
- Denoiser (:class:`FeatureDenoiser`): a residual MLP over one location's feature vector (a 1 x 1
  convolution over the map), epsilon prediction, with its own variance-preserving cosine schedule
  on a continuous time u in (0, 1) (``alpha_bar(u) = cos^2(pi/2 (u + s) / (1 + s))``, s = 0.008,
  normalised to 1 at u = 0). Trained on body locations of ID training slices only.
- Score: at each level u in ``levels`` the standardised vector f is noised,
  ``f_u = sqrt(a) f + sqrt(1 - a) z``, reconstructed in one step (Tweedie:
  ``f_hat = (f_u - sqrt(1 - a) eps(f_u, u)) / sqrt(a)``), and the squared error is averaged over
  each layer's channels; the map is the mean over levels and layers (layers weighted equally, as
  DLSR sums per-layer errors), upsampled (nearest) to pixels. Cost: one prior forward per image
  plus ``len(levels)`` forwards of the small MLP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klip_med.data.masks import BODY_LEVEL_PRIOR, body_mask
from klip_med.errors import expect
from klip_med.eval.companions import (
    cosine_lr,
    init_parameters,
    load_state,
    loss_curve,
    read_companion,
    save_companion,
)
from klip_med.eval.features import unet_features

COSINE_OFFSET = 0.008


def alpha_bar(u: Tensor) -> Tensor:
    """The feature diffusion's cosine schedule at continuous time u in [0, 1] (1 at u = 0)."""
    s = COSINE_OFFSET
    top = torch.cos(0.5 * math.pi * (u + s) / (1 + s)) ** 2
    return (top / math.cos(0.5 * math.pi * s / (1 + s)) ** 2).clamp(1e-5, 1.0)


def time_embedding(u: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of times u (N,) in [0, 1] (scaled by 1000, as DDPM's), (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=u.device) / half)
    angles = 1000.0 * u.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class FeatureDenoiser(nn.Module):
    """Residual MLP predicting the noise of a noised feature vector: ``(N, D), (N,) -> (N, D)``."""

    def __init__(self, dim: int, hidden: int = 384, depth: int = 3, emb: int = 64) -> None:
        super().__init__()
        self.dim, self.hidden, self.depth, self.emb = dim, hidden, depth, emb
        self.inp = nn.Linear(dim, hidden)
        self.temb = nn.Sequential(nn.Linear(emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                    for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        h = self.inp(x) + self.temb(time_embedding(u, self.emb))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def describe(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "emb": self.emb}


def reconstruction_error(net: FeatureDenoiser, x: Tensor, levels: Sequence[float], generator: torch.Generator,
                         layer_channels: Sequence[int]) -> Tensor:
    """Per-vector, per-layer squared reconstruction error, mean over ``levels``: (N, n_layers).

    Args:
        x: (N, D) standardised feature vectors. levels: feature-diffusion times u in (0, 1).
        generator: the noise of each level (one (N, D) draw per level, in order).
        layer_channels: how the D channels split into layers (sums to D).
    """
    expect(sum(layer_channels) == x.shape[1], "layer_channels", f"channel counts summing to {x.shape[1]}",
           list(layer_channels))
    expect(bool(levels) and all(0.0 < u < 1.0 for u in levels), "levels", "times in (0, 1)", list(levels))
    total = torch.zeros(x.shape[0], len(layer_channels), dtype=torch.float32, device=x.device)
    with torch.no_grad():
        for u in levels:
            t = torch.full((x.shape[0],), float(u), device=x.device)
            a = alpha_bar(t)[:, None]
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x_u = a.sqrt() * x + (1 - a).sqrt() * z
            x_hat = (x_u - (1 - a).sqrt() * net(x_u, t)) / a.sqrt()
            sq = (x_hat - x) ** 2
            total += torch.stack([c.mean(dim=1) for c in sq.split(list(layer_channels), dim=1)], dim=1)
    return total / len(levels)


def body_locations(images: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) bool: feature locations whose cell of the (N, 1, H, W) images is mostly body."""
    body = body_mask(images[:, 0], BODY_LEVEL_PRIOR, largest=False, fill_holes=False).float()[:, None]
    return F.adaptive_avg_pool2d(body, size)[:, 0] >= 0.5


@dataclass
class DLSR:
    """A trained feature denoiser with the statistics that standardise the prior's features."""

    net: FeatureDenoiser
    mean: Tensor
    std: Tensor
    layer_channels: tuple[int, ...]
    t_frac: float = 0.05
    levels: tuple[float, ...] = (0.2, 0.4, 0.6)

    def score_vectors(self, features: Tensor, generator: torch.Generator) -> Tensor:
        """(N, n_layers) errors of raw (unstandardised) feature vectors (N, D)."""
        x = (features.to(self.mean.device, torch.float32) - self.mean) / self.std
        return reconstruction_error(self.net, x, self.levels, generator, self.layer_channels)

    def score_map(self, prior, image: Tensor, generator: torch.Generator) -> tuple[Tensor, dict]:
        """(H, W) float32 map on CPU of an image (H, W) in prior units, and per-layer mean errors.

        ``generator`` draws the feature snapshot's noise, then each level's (on the prior's device).
        """
        x = image.reshape(1, 1, *image.shape[-2:])
        feats = unet_features(prior, x, generator, self.t_frac)[0]  # (D, h, w)
        d, h, w = feats.shape
        expect(d == self.mean.numel(), "prior features", f"{self.mean.numel()} channels (the DLSR model's)", d)
        err = self.score_vectors(feats.reshape(d, -1).T, generator)  # (h w, L)
        grid = err.mean(dim=1).reshape(1, 1, h, w)
        out = F.interpolate(grid, size=tuple(image.shape[-2:]), mode="nearest")[0, 0].cpu()
        return out, {"layer_error": [round(float(v), 5) for v in err.mean(dim=0)]}

    def to(self, device: str | torch.device) -> DLSR:
        self.net.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self


def layer_channels(prior) -> tuple[int, ...]:
    """Channels of the three feature layers of :func:`~klip_med.eval.features.unet_features`
    (``down_blocks[1]``, ``down_blocks[2]``, ``middle_block``) from the prior's architecture."""
    channels = list(prior.config.architecture["channels"])
    expect(len(channels) >= 3, "prior architecture", "a UNet with >= 3 levels", channels)
    return (int(channels[1]), int(channels[2]), int(channels[-1]))


def collect_features(prior, images: Tensor, generator: torch.Generator, t_frac: float = 0.05,
                     batch: int = 8) -> Tensor:
    """Feature vectors at the body locations of ``images`` (N, 1, H, W): (M, D) float32 on CPU."""
    rows = []
    for chunk in images.split(batch):
        feats = unet_features(prior, chunk, generator, t_frac).cpu()
        body = body_locations(chunk.cpu(), tuple(feats.shape[-2:]))
        rows.append(feats.permute(0, 2, 3, 1)[body])
    data = torch.cat(rows)
    expect(data.shape[0] >= 2, "images", "training slices with body locations", f"{data.shape[0]} locations")
    return data


def train_dlsr(prior, images: Tensor, generator: torch.Generator, *, steps: int = 4000, batch: int = 1024,
               lr: float = 1e-3, hidden: int = 384, depth: int = 3, t_frac: float = 0.05,
               levels: Sequence[float] = (0.2, 0.4, 0.6), max_vectors: int = 200_000, holdout: float = 0.1,
               time_limit_s: float | None = None, log: Callable[[str], None] | None = None) -> tuple[DLSR, dict]:
    """Train the feature denoiser on ID slices (CPU is enough).

    Every ``round(1 / holdout)``-th slice is held out: the training report gives the denoising loss
    and the DLSR error of its locations next to those of the training locations.

    Args:
        images: (N, 1, H, W) ID training slices in prior units (e.g.
            :func:`klip_med.eval.features.training_slices`).
        generator: CPU generator for every draw (feature snapshots, subsampling, init, batches, noise).
        steps: optimiser steps (AdamW, warm-up then cosine decay); ``time_limit_s`` stops earlier.
        max_vectors: training locations kept (a random subset when there are more).

    Returns:
        the model (eval mode, CPU) and its training record (for the companion config).
    """
    say = log or (lambda _msg: None)
    expect(images.ndim == 4 and images.shape[0] >= 2, "images", "(N >= 2, 1, H, W) training slices",
           tuple(images.shape))
    expect(isinstance(steps, int) and steps >= 1, "steps", "a positive integer", steps)
    start = time.perf_counter()
    every = max(2, round(1 / holdout)) if holdout > 0 else 0
    held = torch.zeros(images.shape[0], dtype=torch.bool)
    if every:
        held[every - 1::every] = True
    feats = collect_features(prior, images[~held], generator, t_frac)
    val = collect_features(prior, images[held], generator, t_frac) if bool(held.any()) else feats[:0]
    if feats.shape[0] > max_vectors:
        feats = feats[torch.randperm(feats.shape[0], generator=generator)[:max_vectors]]
    extract_s = time.perf_counter() - start
    say(f"dlsr: {feats.shape[0]} training / {val.shape[0]} held-out locations of {feats.shape[1]} features "
        f"({extract_s:.0f} s)")
    mean, std = feats.mean(dim=0), feats.std(dim=0).clamp_min(1e-6)
    x = (feats - mean) / std
    net, losses = fit_denoiser(x, generator, steps=steps, batch=batch, lr=lr, hidden=hidden, depth=depth,
                               time_limit_s=None if time_limit_s is None else time_limit_s - extract_s, log=say)
    model = DLSR(net, mean, std, layer_channels(prior), t_frac, tuple(float(v) for v in levels))
    record = {"steps_trained": len(losses), "steps_planned": steps, "batch": batch, "lr": lr,
              "seconds": round(time.perf_counter() - start, 1), "feature_seconds": round(extract_s, 1),
              "train_slices": int((~held).sum()), "heldout_slices": int(held.sum()),
              "train_locations": int(feats.shape[0]), "heldout_locations": int(val.shape[0]),
              "final_loss": round(float(np.mean(losses[-max(1, len(losses) // 10):])), 6),
              "loss_curve": loss_curve(losses)}
    check = torch.Generator().manual_seed(0)
    for name, data in (("train", feats[:20_000]), ("heldout", val[:20_000])):
        if data.shape[0]:
            xs = (data - mean) / std
            record[f"{name}_denoising_loss"] = round(_denoising_loss(net, xs, check), 6)
            record[f"{name}_dlsr_error"] = round(float(model.score_vectors(data, check).mean()), 6)
    return model, record


def fit_denoiser(x: Tensor, generator: torch.Generator, *, steps: int = 4000, batch: int = 1024, lr: float = 1e-3,
                 hidden: int = 384, depth: int = 3, time_limit_s: float | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[FeatureDenoiser, list[float]]:
    """Train a :class:`FeatureDenoiser` on standardised vectors ``x`` (M, D) with the epsilon loss at
    times u ~ U(0.001, 0.999); returns the network (eval mode) and the loss of every step."""
    say = log or (lambda _msg: None)
    expect(x.ndim == 2 and x.shape[0] >= 2, "x", "(M >= 2, D) feature vectors", tuple(x.shape))
    start = time.perf_counter()
    net = init_parameters(FeatureDenoiser(x.shape[1], hidden, depth), generator)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, min(200, steps // 10 + 1))
        idx = torch.randint(0, x.shape[0], (batch,), generator=generator)
        u = torch.rand(batch, generator=generator) * (1 - 2e-3) + 1e-3
        z = torch.randn((batch, x.shape[1]), generator=generator)
        a = alpha_bar(u)[:, None]
        loss = F.mse_loss(net(a.sqrt() * x[idx] + (1 - a).sqrt() * z, u), z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 500 == 0:
            say(f"dlsr: step {step + 1}/{steps} loss {np.mean(losses[-500:]):.4f} ({time.perf_counter() - start:.0f} s)")
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            say(f"dlsr: time limit reached after {step + 1} steps")
            break
    return net.eval().requires_grad_(False), losses


def _denoising_loss(net: FeatureDenoiser, x: Tensor, generator: torch.Generator) -> float:
    u = torch.rand(x.shape[0], generator=generator) * (1 - 2e-3) + 1e-3
    z = torch.randn(x.shape, generator=generator)
    a = alpha_bar(u)[:, None]
    with torch.no_grad():
        return float(F.mse_loss(net(a.sqrt() * x + (1 - a).sqrt() * z, u), z))


def save_dlsr(model: DLSR, folder, prior, training: dict, weights_dtype: str = "float16"):
    """Write the model as a ``dlsr`` companion of ``prior`` (:mod:`klip_med.eval.companions`)."""
    tensors = {f"net.{k}": v for k, v in model.net.state_dict().items()}
    tensors.update(feature_mean=model.mean, feature_std=model.std)
    spec = {**model.net.describe(), "layer_channels": list(model.layer_channels), "t_frac": model.t_frac,
            "levels": list(model.levels), "schedule": f"cosine, s = {COSINE_OFFSET}, continuous u in (0, 1)"}
    return save_companion(folder, "dlsr", prior, spec, tensors, training, weights_dtype,
                          exact=("feature_mean", "feature_std"))


def load_dlsr(folder, prior=None, device: str | torch.device = "cpu") -> DLSR:
    """Read a ``dlsr`` companion (refused for another prior than ``prior`` when given)."""
    config, tensors = read_companion(folder, "dlsr", prior)
    spec = config["model"]
    net = FeatureDenoiser(int(spec["dim"]), int(spec["hidden"]), int(spec["depth"]), int(spec["emb"]))
    load_state(net, {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, f"{folder}: dlsr")
    expect("feature_mean" in tensors and "feature_std" in tensors, f"{folder}: dlsr", "feature_mean and feature_std",
           sorted(tensors)[:4])
    model = DLSR(net.eval().requires_grad_(False), tensors["feature_mean"], tensors["feature_std"],
                 tuple(int(c) for c in spec["layer_channels"]), float(spec["t_frac"]),
                 tuple(float(v) for v in spec["levels"]))
    return model.to(device)
