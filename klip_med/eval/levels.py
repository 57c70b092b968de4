"""The label in-distribution slices carry for free: their anatomical level, and the classifier of it.

A slice's level is its position in its volume, binned: ``level = min(n - 1, floor(n (i + 0.5) / S))``
for slice index ``i`` of a volume of ``S`` slices and ``n`` bins (brain level for the LGG FLAIR
volumes, which run from the skull base to the vertex; body level for the L067 CT, pelvis to liver).
:func:`level_data` reads healthy slices of a manifest split with their levels (in prior units, by
the same intensity rule as the benchmark's slice selection); :func:`train_level_classifier` trains
the noise-aware :class:`~klip_med.eval.diffguard.LevelClassifier` on them; :func:`level_accuracy`
measures it at a few noise levels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from klip_med.data.masks import body_fraction
from klip_med.errors import expect
from klip_med.eval.companions import cosine_lr, init_parameters, loss_curve
from klip_med.eval.diffguard import LevelClassifier

DEFAULT_LEVELS = 6


def level_of(index: int, n_slices: int, n_levels: int) -> int:
    """The level bin of slice ``index`` of a volume of ``n_slices`` slices."""
    expect(0 <= index < n_slices, "index", f"a slice index in [0, {n_slices})", index)
    return min(n_levels - 1, int(n_levels * (index + 0.5) / n_slices))


@dataclass
class LevelData:
    """Slices with their levels.

    Attributes:
        images: (N, 1, H, W) float32 in prior units. levels: (N,) int64. positions: (N,) float,
        (i + 0.5) / S. groups: (N,) the manifest file of each slice (its patient / volume).
    """

    images: Tensor
    levels: Tensor
    positions: Tensor
    groups: list[str]

    def subset(self, keep: Tensor) -> LevelData:
        idx = torch.as_tensor(keep).nonzero().reshape(-1)
        return LevelData(self.images[idx], self.levels[idx], self.positions[idx], [self.groups[i] for i in idx.tolist()])


def level_data(manifest, prior, split: str, n_levels: int = DEFAULT_LEVELS, min_body_fraction: float = 0.3,
               max_slices: int | None = None) -> LevelData:
    """Healthy slices of ``split`` with their levels (body fraction >= ``min_body_fraction``; slices
    with any lesion pixel, when the manifest has masks, left out); ``max_slices`` evenly spaced."""
    rule = prior.config.intensity
    images, levels, positions, groups = [], [], [], []
    for item in manifest.split(split):
        with np.load(item.path) as data:
            volume = data[manifest.array_key].astype(np.float32)
            lesion = data[manifest.mask_key].reshape(volume.shape[0], -1).any(axis=1) if manifest.mask_key else None
        model = rule.to_model(volume, rule.mr_scale(volume) if rule.kind == "mr-percentile" else None)
        n = volume.shape[0]
        for i in item.slice_indices(n):
            if (lesion is not None and lesion[i]) or body_fraction(model[i]) < min_body_fraction:
                continue
            images.append(model[i])
            levels.append(level_of(i, n, n_levels))
            positions.append((i + 0.5) / n)
            groups.append(item.relative)
    expect(bool(images), f"{manifest.source}: split {split!r}", "healthy slices with body fraction >= "
           f"{min_body_fraction}", "none")
    keep = list(range(len(images)))
    if max_slices is not None and len(keep) > max_slices:
        keep = sorted({int(v) for v in np.linspace(0, len(keep) - 1, max_slices).round()})
    return LevelData(torch.from_numpy(np.stack([images[k] for k in keep])[:, None].copy()),
                     torch.tensor([levels[k] for k in keep], dtype=torch.int64),
                     torch.tensor([positions[k] for k in keep], dtype=torch.float32), [groups[k] for k in keep])


def train_level_classifier(data: LevelData, alphas_cumprod: Tensor, generator: torch.Generator, *,
                           n_levels: int = DEFAULT_LEVELS, channels: Sequence[int] = (16, 32, 64, 64),
                           steps: int = 4000, batch: int = 64, lr: float = 2e-3, flip_lr: bool = False,
                           time_limit_s: float | None = None,
                           log: Callable[[str], None] | None = None) -> tuple[LevelClassifier, dict]:
    """Train the noise-aware level classifier (cross-entropy at uniform random timesteps).

    Batches are class-balanced (each slice drawn with probability proportional to one over its
    level's count); ``flip_lr`` adds random left-right flips (brain: yes; abdomen: no).

    Returns:
        the classifier (eval mode, CPU) and its training record.
    """
    say = log or (lambda _msg: None)
    expect(int(data.levels.max()) < n_levels, "data.levels", f"levels below n_levels = {n_levels}",
           int(data.levels.max()))
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).float()
    T = abar.numel()
    net = init_parameters(LevelClassifier(n_levels, tuple(channels), T), generator)
    counts = torch.bincount(data.levels, minlength=n_levels).float()
    weights = (1.0 / counts.clamp_min(1))[data.levels]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    losses, hits = [], []
    start = time.perf_counter()
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, min(200, steps // 10 + 1))
        idx = torch.multinomial(weights, batch, replacement=True, generator=generator)
        x0 = data.images[idx]
        if flip_lr:
            flip = torch.rand(batch, generator=generator) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, T, (batch,), generator=generator)
        a = abar[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
        logits = net(x_t, t.float())
        loss = F.cross_entropy(logits, data.levels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        hits.append(float((logits.argmax(1) == data.levels[idx]).float().mean()))
        if (step + 1) % 250 == 0:
            say(f"diffguard: step {step + 1}/{steps} loss {np.mean(losses[-250:]):.4f} "
                f"accuracy {np.mean(hits[-250:]):.3f} ({time.perf_counter() - start:.0f} s)")
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            say(f"diffguard: time limit reached after {step + 1} steps")
            break
    net.eval().requires_grad_(False)
    tail = max(1, len(losses) // 10)
    record = {"steps_trained": len(losses), "steps_planned": steps, "batch": batch, "lr": lr, "flip_lr": flip_lr,
              "seconds": round(time.perf_counter() - start, 1), "train_slices": int(data.levels.numel()),
              "train_level_counts": [int(c) for c in counts],
              "final_loss": round(float(np.mean(losses[-tail:])), 6),
              "final_batch_accuracy": round(float(np.mean(hits[-tail:])), 4), "loss_curve": loss_curve(losses)}
    return net, record


def level_accuracy(classifier, data: LevelData, alphas_cumprod: Tensor, generator: torch.Generator,
                   timesteps: Sequence[int] = (0, 100, 250, 500), batch: int = 32) -> dict:
    """Accuracy (exact and within one bin) of the classifier on ``data`` at training timesteps
    ``timesteps`` (one noise draw per image and timestep; those beyond the schedule are left out),
    and the class counts."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).float()
    out = {"n": int(data.levels.numel()),
           "level_counts": [int(c) for c in torch.bincount(data.levels, minlength=classifier.n_levels)]}
    for t in [t for t in timesteps if 0 <= int(t) < abar.numel()]:
        preds = []
        for chunk in data.images.split(batch):
            a = abar[int(t)]
            x_t = a.sqrt() * chunk + (1 - a).sqrt() * torch.randn(chunk.shape, generator=generator)
            with torch.no_grad():
                preds.append(classifier(x_t, torch.full((chunk.shape[0],), float(t))).argmax(1))
        pred = torch.cat(preds)
        out[f"t={int(t)}"] = {"accuracy": round(float((pred == data.levels).float().mean()), 4),
                              "within_one": round(float(((pred - data.levels).abs() <= 1).float().mean()), 4)}
    return out
