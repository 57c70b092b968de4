"""DiffGuard baseline: semantic mismatch between an image and its classifier-guided re-generation.

After Gao et al., "DiffGuard: Semantic Mismatch-Guided Out-of-Distribution Detection using
Pre-trained Diffusion Models" (ICCV 2023): a classifier predicts a label for the input; a
diffusion model, conditioned on that label (here by classifier guidance of the unconditional
prior, Dhariwal & Nichol 2021), re-generates the input from a partly noised copy; an
in-distribution input agrees with a generation of its own label, an OOD input does not.

Medical reconstructions carry no class label, but in-distribution slices carry one for free: the
anatomical level (where the slice lies in its volume, :mod:`klip_med.eval.levels`). The pieces:

- :class:`LevelClassifier`: a small noise-aware CNN ``p(level | x_t, t)`` (the input average-pooled
  by 2, four stride-2 blocks with the timestep added through a FiLM scale and shift, global
  pooling, a linear head), trained on healthy training slices at random timesteps.
- :func:`guided_regeneration`: the image is noised to ``t_start = round(t_frac (T - 1))`` with one
  Gaussian draw and denoised by ``steps`` deterministic DDIM steps of the prior with the guided
  noise estimate ``eps - scale sqrt(1 - a_t) grad_x log p(label | x_t, t)``.
- :func:`diffguard_map`: label = the classifier's prediction for the reconstruction (at t = 0);
  map = squared distance between the classifier's mid-level features (the second block's map; for
  128 x 128 one location per 8 x 8 pixels) of the reconstruction and of its guided re-generation,
  mean over channels, upsampled (nearest) to pixels. Its ``info`` holds the image-level mismatch
  DiffGuard scores by (the KL between the classifier's level distributions of the two images).
  Cost: ``steps`` prior forwards plus ``steps`` classifier forward + backward passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klip_med.errors import expect
from klip_med.eval.companions import load_state, read_companion, save_companion
from klip_med.eval.dlsr import time_embedding
from klip_med.sampling.schedule import VPSchedule


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(max(1, c_out // 8), c_out)  # groups of 8 channels (a 1 x 1 map keeps its pattern)
        self.film = nn.Linear(emb, 2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(max(1, c_out // 8), c_out)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm1(self.conv1(x)) * (1 + scale) + shift)
        return F.silu(h + self.norm2(self.conv2(h)))


class LevelClassifier(nn.Module):
    """Noise-aware anatomical-level classifier: ``(x_t (B, 1, H, W), t (B,)) -> logits (B, n_levels)``.

    Args:
        n_levels: number of level bins.
        channels: channels of the four stride-2 blocks.
        num_train_timesteps: T of the prior's schedule (the embedding sees t / T).
    """

    def __init__(self, n_levels: int, channels: tuple[int, ...] = (16, 32, 64, 64), num_train_timesteps: int = 1000,
                 emb: int = 64) -> None:
        super().__init__()
        expect(isinstance(n_levels, int) and n_levels >= 2, "n_levels", "an integer >= 2", n_levels)
        self.n_levels, self.channels, self.num_train_timesteps, self.emb = n_levels, tuple(channels), \
            int(num_train_timesteps), emb
        self.temb = nn.Sequential(nn.Linear(emb, emb), nn.SiLU())
        widths = (1, *self.channels)
        self.blocks = nn.ModuleList(_Block(a, b, emb) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head = nn.Linear(self.channels[-1], n_levels)

    def _embed(self, t: Tensor, batch: int, device) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        return self.temb(time_embedding(t / self.num_train_timesteps, self.emb))

    def trunk(self, x: Tensor, t: Tensor | float) -> list[Tensor]:
        """The output of every block, coarsest last."""
        e = self._embed(t, x.shape[0], x.device)
        h = F.avg_pool2d(x, 2)
        outs = []
        for block in self.blocks:
            h = block(h, e)
            outs.append(h)
        return outs

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.head(self.trunk(x, t)[-1].mean(dim=(2, 3)))

    def features(self, x: Tensor) -> Tensor:
        """Mid-level features of clean images (t = 0): the second block's map, (B, C, H / 8, W / 8)."""
        return self.trunk(x, 0.0)[1]

    def describe(self) -> dict:
        return {"n_levels": self.n_levels, "channels": list(self.channels),
                "num_train_timesteps": self.num_train_timesteps, "emb": self.emb}


def _eps(prior, x: Tensor, t: int) -> Tensor:
    with torch.no_grad():
        return prior.eps(x, torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device))


def log_prob_gradient(classifier, x: Tensor, t: int, label: Tensor) -> Tensor:
    """``grad_x log p(label | x, t)`` of a classifier returning logits, (B, C, H, W)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logp = torch.log_softmax(classifier(x, torch.full((x.shape[0],), float(t), device=x.device)), dim=1)
        picked = logp.gather(1, label.reshape(-1, 1)).sum()
        (grad,) = torch.autograd.grad(picked, x)
    return grad


def guided_regeneration(prior, classifier, image: Tensor, label: Tensor, generator: torch.Generator,
                        t_frac: float = 0.5, steps: int = 10, scale: float = 3.0) -> tuple[Tensor, list[int]]:
    """Re-generate ``image`` (B, C, H, W) towards ``label`` (B,) by classifier-guided DDIM.

    The image is noised to ``t_start = round(t_frac (T - 1))`` with one draw of ``generator`` and
    denoised by ``steps`` DDIM (eta = 0) steps with the guided noise estimate
    ``eps - scale sqrt(1 - a_t) grad log p(label | x_t, t)``; ``scale = 0`` is the unguided prior.

    Returns:
        the re-generation (B, C, H, W), clipped to [-1, 1], and the timesteps used.
    """
    expect(0.0 < t_frac < 1.0, "t_frac", "a normalised time in (0, 1)", t_frac)
    expect(isinstance(steps, int) and steps >= 1, "steps", "a positive integer", steps)
    schedule = VPSchedule(prior.alphas_cumprod)
    t_start = int(round(t_frac * (schedule.num_train_timesteps - 1)))
    ts = sorted({int(round(v)) for v in np.linspace(t_start, 0, steps)}, reverse=True)
    a = schedule.alpha_bar(t_start)
    z = torch.randn(image.shape, generator=generator, device=image.device, dtype=torch.float32)
    x = math.sqrt(a) * image + math.sqrt(1 - a) * z
    x0 = image
    for k, t in enumerate(ts):
        a = schedule.alpha_bar(t)
        eps = _eps(prior, x, t)
        if scale:
            eps = eps - scale * math.sqrt(1 - a) * log_prob_gradient(classifier, x, t, label)
        x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1.0, 1.0)
        if k + 1 < len(ts):
            a_next = schedule.alpha_bar(ts[k + 1])
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return x0.detach(), ts


def _kl(p_logits: Tensor, q_logits: Tensor) -> float:
    p = torch.log_softmax(p_logits, dim=-1)
    q = torch.log_softmax(q_logits, dim=-1)
    return float((p.exp() * (p - q)).sum())


def diffguard_map(prior, classifier, image: Tensor, generator: torch.Generator, t_frac: float = 0.5,
                  steps: int = 10, scale: float = 3.0) -> tuple[Tensor, int, dict]:
    """DiffGuard's semantic mismatch map of one image (H, W) in prior units.

    Returns:
        ``(map, nfe, info)``: map (H, W) float32 on CPU; nfe = prior forwards; info = the predicted
        level, the level distribution of the image and of its re-generation, their KL (the
        image-level mismatch), the mean absolute pixel change and the timesteps.
    """
    x = image.reshape(1, 1, *image.shape[-2:]).to(prior.device, torch.float32)
    with torch.no_grad():
        logits = classifier(x, torch.zeros(1, device=x.device))
    label = logits.argmax(dim=1)
    regen, ts = guided_regeneration(prior, classifier, x, label, generator, t_frac, steps, scale)
    with torch.no_grad():
        f0, f1 = classifier.features(x), classifier.features(regen)
        regen_logits = classifier(regen, torch.zeros(1, device=x.device))
    mismatch = (f0 - f1).square().mean(dim=1, keepdim=True)
    out = F.interpolate(mismatch, size=tuple(image.shape[-2:]), mode="nearest")[0, 0].float().cpu()
    info = {"level": int(label), "p_level": [round(float(v), 4) for v in torch.softmax(logits, 1)[0]],
            "p_level_regen": [round(float(v), 4) for v in torch.softmax(regen_logits, 1)[0]],
            "level_kl": round(_kl(logits[0], regen_logits[0]), 6),
            "pixel_change": round(float((regen - x).abs().mean()), 6), "timesteps": ts,
            "classifier_calls": len(ts) + 4}
    return out, len(ts), info


@dataclass
class DiffGuard:
    """A level classifier with the guidance settings it is used with."""

    classifier: LevelClassifier
    t_frac: float = 0.5
    steps: int = 10
    scale: float = 3.0

    def score_map(self, prior, image: Tensor, generator: torch.Generator) -> tuple[Tensor, int, dict]:
        return diffguard_map(prior, self.classifier, image, generator, self.t_frac, self.steps, self.scale)


def save_diffguard(classifier: LevelClassifier, folder, prior, training: dict):
    """Write a level classifier as the ``diffguard`` companion of ``prior``."""
    tensors = dict(classifier.state_dict())
    return save_companion(folder, "diffguard", prior, classifier.describe(), tensors, training, "float32")


def load_diffguard(folder, prior=None, device: str | torch.device = "cpu") -> tuple[LevelClassifier, dict]:
    """Read a ``diffguard`` companion: the classifier (eval mode) and its config."""
    config, tensors = read_companion(folder, "diffguard", prior)
    spec = config["model"]
    net = LevelClassifier(int(spec["n_levels"]), tuple(int(c) for c in spec["channels"]),
                          int(spec["num_train_timesteps"]), int(spec["emb"]))
    load_state(net, tensors, f"{folder}: diffguard")
    return net.to(device).eval().requires_grad_(False), config
