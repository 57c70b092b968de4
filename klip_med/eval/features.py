"""Canonical-feature-snapshot baseline (``cfs``): the prior's own UNet features of the
reconstruction at one low noise level, scored by a Gaussian density fitted on in-distribution
training slices. Unlike every other method in the benchmark it uses ID training data.

Features: the image is noised to the canonical timestep ``t_c = round(t_frac (T - 1))`` with one
fixed Gaussian draw per image and passed once through the UNet; the outputs of ``down_blocks[1]``,
``down_blocks[2]`` and ``middle_block`` are captured with forward hooks, resized to the grid of the
first (nearest-neighbour upsampling of the coarser ones) and stacked into one vector per location
(for the 128 x 128 shipped priors: 32 x 32 locations of 64 + 128 + 128 = 320 values, one per 4 x 4
pixels). Fit: mean and Ledoit-Wolf shrunk covariance over all body locations of ``n`` training
slices. Score: squared Mahalanobis distance per location, upsampled (nearest) to pixels.
One network forward per image; ``n`` forwards once per run for the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from klip_med.data.masks import BODY_LEVEL_PRIOR, body_mask
from klip_med.errors import KLIPMedError
from klip_med.sampling.schedule import VPSchedule
from klip_med.score.windows import timestep_at


def _layers(prior) -> list[torch.nn.Module]:
    unet = getattr(prior, "unet", None)
    if unet is None or not hasattr(unet, "down_blocks") or len(unet.down_blocks) < 3:
        raise KLIPMedError("prior: expected a MONAI DiffusionModelUNet with >= 3 down blocks for the cfs "
                           f"baseline, found {type(unet).__name__}")
    return [unet.down_blocks[1], unet.down_blocks[2], unet.middle_block]


@torch.no_grad()
def unet_features(prior, images: Tensor, generator: torch.Generator, t_frac: float = 0.05) -> Tensor:
    """Stacked UNet features of ``images`` (B, 1, H, W) at the canonical noise level, (B, D, h, w)."""
    schedule = VPSchedule(prior.alphas_cumprod)
    t = int(round(timestep_at(t_frac, schedule.num_train_timesteps)))
    a = schedule.alpha_bar(t)
    x = images.to(prior.device, torch.float32)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    captured: list[Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in _layers(prior)]
    try:
        prior.eps(math.sqrt(a) * x + math.sqrt(1 - a) * noise,
                  torch.full((x.shape[0],), float(t), device=x.device))
    finally:
        for h in handles:
            h.remove()
    size = captured[0].shape[-2:]
    return torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in captured],
                     dim=1).float()


def _body_locations(images: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) bool: feature locations whose cell of the (N, 1, H, W) images is mostly body
    (:func:`klip_med.data.masks.body_mask` at the slice-selection level, no component rules)."""
    body = body_mask(images[:, 0], BODY_LEVEL_PRIOR, largest=False, fill_holes=False).float()[:, None]
    return F.adaptive_avg_pool2d(body, size)[:, 0] >= 0.5


@dataclass(frozen=True)
class FeatureDensity:
    """A Gaussian over feature vectors: mean (D,), precision (D, D), fitted on ``n_locations``."""

    mean: Tensor
    precision: Tensor
    n_slices: int
    n_locations: int
    t_frac: float

    def score_map(self, prior, image: Tensor, generator: torch.Generator) -> Tensor:
        """Squared Mahalanobis distance per location, upsampled to pixels: (H, W) float32 on CPU.

        Args:
            image: (H, W) the reconstruction in prior units.
        """
        x = image.reshape(1, 1, *image.shape[-2:])
        feats = unet_features(prior, x, generator, self.t_frac)[0]  # (D, h, w)
        d = feats.shape[0]
        flat = feats.reshape(d, -1).T.to(self.mean.device, torch.float64) - self.mean
        maha = ((flat @ self.precision) * flat).sum(dim=1).reshape(1, 1, *feats.shape[-2:])
        return F.interpolate(maha.float(), size=tuple(image.shape[-2:]), mode="nearest")[0, 0].cpu()


def fit_feature_density(prior, images: Tensor, generator: torch.Generator, t_frac: float = 0.05,
                        batch: int = 16) -> FeatureDensity:
    """Fit the ID feature density on training slices.

    Args:
        images: (N, 1, H, W) in-distribution slices in prior units.
        generator: the noise draws of the feature snapshots.
    """
    from sklearn.covariance import LedoitWolf

    if images.ndim != 4 or images.shape[0] < 1:
        raise KLIPMedError(f"images: expected (N, 1, H, W) training slices, found {tuple(images.shape)}")
    rows = []
    for chunk in images.split(batch):
        feats = unet_features(prior, chunk, generator, t_frac).cpu()
        body = _body_locations(chunk.cpu(), tuple(feats.shape[-2:]))
        rows.append(feats.permute(0, 2, 3, 1)[body].double())
    data = torch.cat(rows).numpy()
    if data.shape[0] < 2:
        raise KLIPMedError(f"cfs: expected at least 2 body locations in the training slices, found {data.shape[0]}")
    lw = LedoitWolf().fit(data)
    return FeatureDensity(torch.from_numpy(lw.location_), torch.from_numpy(lw.precision_), int(images.shape[0]),
                          int(data.shape[0]), t_frac)


def training_slices(manifest, prior, n: int, min_body_fraction: float = 0.3) -> Tensor:
    """``n`` train-split slices with body fraction >= ``min_body_fraction``, evenly spaced through
    the split, in prior units (MR: each volume scaled by the prior's rule), (n, 1, H, W)."""
    rule = prior.config.intensity
    pool: list[np.ndarray] = []
    for item in manifest.split("train"):
        with np.load(item.path) as data:
            volume = data[manifest.array_key].astype(np.float32)
        model = rule.to_model(volume, rule.mr_scale(volume) if rule.kind == "mr-percentile" else None)
        pool += [model[i] for i in item.slice_indices(volume.shape[0]) if (model[i] > -0.9).mean() >= min_body_fraction]
    if not pool:
        raise KLIPMedError(f"{manifest.source}: cfs: expected train-split slices to fit the feature density, "
                           "found none (skip the baseline with --skip cfs)")
    picks = sorted({int(i) for i in np.linspace(0, len(pool) - 1, min(n, len(pool))).round()})
    return torch.from_numpy(np.stack([pool[i] for i in picks])[:, None].copy())
