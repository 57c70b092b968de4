"""One optimiser step of ``klip-med train``, and how the network runs while training.

:func:`train_step` is the whole step (sample a batch, augment, noise, epsilon MSE, backward,
AdamW, EMA); :class:`TrainOptions` says how it executes (precision, ``torch.compile``,
channels-last, fused AdamW). The options change speed and rounding, not the method: they are run
options, not settings, so a run started compiled can resume eagerly from its checkpoint (and the
throughput probe of ``klip_med.bench`` times exactly this step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klip_med.errors import expect

PRECISIONS = ("auto", "bf16", "float32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class TrainOptions:
    """How a training step executes.

    Attributes:
        precision: ``auto`` (bf16 autocast on CUDA, float32 elsewhere: the default since the
            shipped priors), ``bf16`` (autocast of the network's forward and backward to bfloat16
            on any device; the loss, the optimiser and the EMA stay float32) or ``float32``.
        compile_mode: ``torch.compile`` mode of the network, or None for eager.
        compile_backend: ``inductor`` (the real thing); ``aot_eager`` / ``eager`` only trace
            (seconds instead of minutes on a CPU: dry runs and tests of the plumbing).
        channels_last: channels-last activations and weights; None = on CUDA only.
        fused_adam: AdamW's fused kernel (one launch per step instead of a few per tensor group).
    """

    precision: str = "auto"
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    channels_last: bool | None = None
    fused_adam: bool = False

    def __post_init__(self) -> None:
        expect(self.precision in PRECISIONS, "--precision", f"one of {list(PRECISIONS)}", repr(self.precision))
        expect(self.compile_mode is None or self.compile_mode in COMPILE_MODES, "--compile-mode",
               f"one of {list(COMPILE_MODES)}", repr(self.compile_mode))
        expect(self.compile_backend in COMPILE_BACKENDS, "--compile-backend",
               f"one of {list(COMPILE_BACKENDS)}", repr(self.compile_backend))

    def bf16(self, device: torch.device) -> bool:
        """Whether the network is autocast to bfloat16 on ``device``."""
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")

    def use_channels_last(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.channels_last is None else self.channels_last

    def describe(self, device: torch.device) -> dict:
        """What a run's provenance records about its execution."""
        return {"mixed_precision": "bf16 autocast" if self.bf16(device) else "float32",
                "compile": (None if self.compile_mode is None
                            else f"{self.compile_mode} ({self.compile_backend})"),
                "channels_last": self.use_channels_last(device), "fused_adam": self.fused_adam}


def compile_network(unet: nn.Module, options: TrainOptions) -> nn.Module:
    """``unet`` itself (eager) or its ``torch.compile`` wrapper (same parameters, same state dict)."""
    if options.compile_mode is None:
        return unet
    if options.compile_backend == "inductor":
        return torch.compile(unet, mode=options.compile_mode)
    return torch.compile(unet, backend=options.compile_backend)


def augment(batch: Tensor, settings, gen: torch.Generator) -> Tensor:
    """Random flips / rotation / zoom / intensity jitter of a (B, 1, H, W) batch in [-1, 1].

    Geometric changes resample bilinearly with the background value -1 outside the image.
    All draws come from ``gen`` in a fixed order (exact resume). ``settings`` is a
    :class:`~klip_med.priors.train.TrainSettings`.
    """
    b = batch.shape[0]
    dev = batch.device
    uniform = lambda: torch.rand(b, generator=gen, device=dev) * 2 - 1  # noqa: E731
    flip, rot, zoom, gain, offset = (uniform() for _ in range(5))
    if settings.flip_lr:
        batch = torch.where((flip > 0)[:, None, None, None], batch.flip(-1), batch)
    if settings.rotate_deg > 0 or settings.scale_jitter > 0:
        angle = rot * math.radians(settings.rotate_deg)
        scale = 1.0 + zoom * settings.scale_jitter
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], -1),
                             torch.stack([sin, cos, torch.zeros_like(cos)], -1)], 1)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        batch = F.grid_sample(batch + 1.0, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False) - 1.0
    if settings.gain_jitter > 0 or settings.offset_jitter > 0:
        g = (1.0 + gain * settings.gain_jitter)[:, None, None, None]
        o = (offset * settings.offset_jitter)[:, None, None, None]
        batch = ((batch + 1.0) * g - 1.0 + o).clamp(-1.0, 1.0)
    return batch


def make_optimizer(unet: nn.Module, settings, device: torch.device, options: TrainOptions):
    """AdamW over the network's parameters (fused when the options ask for it)."""
    extra = {"fused": True} if options.fused_adam else {}
    return torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, **extra)


def train_step(net: nn.Module, unet: nn.Module, opt, ema, scheduler, images: Tensor, settings,
               gen: torch.Generator, *, bf16: bool, channels_last: bool) -> Tensor:
    """One step on a random batch of ``images`` (N, 1, H, W); returns the loss (a device scalar).

    Args:
        net: what the forward runs (``unet`` or its compiled wrapper); ``unet`` owns the
            parameters the optimiser steps and the EMA follows.
        opt, ema: the AdamW optimiser and the ``AveragedModel`` EMA of ``unet``.
        scheduler: MONAI's ``DDPMScheduler`` (``add_noise``).
        settings: the run's ``TrainSettings`` (batch size, number of timesteps, augmentation).
        gen: the one generator every draw comes from, in a fixed order.
        bf16, channels_last: from :class:`TrainOptions` for this device.
    """
    dev = images.device
    idx = torch.randint(0, images.shape[0], (settings.batch_size,), generator=gen, device=dev)
    x0 = augment(images[idx], settings, gen)
    noise = torch.randn(x0.shape, generator=gen, device=dev)
    t = torch.randint(0, settings.num_train_timesteps, (x0.shape[0],), generator=gen, device=dev)
    x_t = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
    if channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
        pred = net(x_t, t)
    loss = F.mse_loss(pred.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema.update_parameters(unet)
    return loss.detach()
