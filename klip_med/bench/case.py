"""What a benchmark runs on: the prior (as loaded, or untrained at another size), the network
options (bf16 autocast, channels-last, ``torch.compile``), and a measured real-looking slice.

Images are (B, 1, H, W) float32 in the prior's [-1, 1] units; B slices are the same demo slice
measured with independent noise draws.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from klip_med.bench.settings import BenchSettings, check_image_size
from klip_med.errors import KLIPMedError

# the demo's operators (klip_med.pipeline.demo.MRI_PHYSICS / CT_PHYSICS), by prior modality
DEFAULT_PHYSICS = {"MR": "mri:accel=4,center=0.08,noise=0.01", "CT": "ct-sparse:views=60,noise=0.5"}


class NetworkOptions(nn.Module):
    """The prior's UNet with the benchmark's execution options; same weights, same call.

    Args:
        unet: ``(x (B, C, H, W), t (B,)) -> eps``, float32 weights.
        device_type: ``"cpu"`` or ``"cuda"`` (for autocast).
        bf16: autocast the network to bfloat16; the output is cast back to float32.
        channels_last: feed the network channels-last inputs (the caller converts the weights).
        compile_mode: ``torch.compile`` mode, or ``None`` for eager.
        compile_backend: ``inductor``; ``aot_eager`` / ``eager`` only trace (dry runs on a CPU).
    """

    def __init__(self, unet: nn.Module, device_type: str, *, bf16: bool = False,
                 channels_last: bool = False, compile_mode: str | None = None,
                 compile_backend: str = "inductor") -> None:
        super().__init__()
        if compile_mode is None:
            self.net = unet
        elif compile_backend == "inductor":
            self.net = torch.compile(unet, mode=compile_mode)
        else:
            self.net = torch.compile(unet, backend=compile_backend)
        self.device_type = device_type
        self.bf16 = bf16
        self.channels_last = channels_last
        # CUDA graphs reuse their output buffers at the next replay: the sampler keeps outputs across steps
        self.copy_out = compile_mode == "reduce-overhead"

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(x, t)
        out = out.to(torch.float32).contiguous()
        return out.clone() if self.copy_out else out


@dataclass
class BenchCase:
    """The prior and the measured slice(s) of one benchmark.

    Attributes:
        prior: the float32 :class:`~klip_med.priors.diffusion.DiffusionPrior` (eval, no grad).
        trained: whether its weights were loaded (else a random init: timing only).
        truth: (B, 1, H, W) ground truth, prior units.
        physics: the operator, ``physics_spec`` its string.
        y: (B, ...) measurements of ``truth``.
        source: where the truth slice comes from.
    """

    prior: Any
    trained: bool
    truth: Tensor
    physics: Any
    physics_spec: str
    y: Tensor
    source: str

    def network_view(self, settings: BenchSettings, *, bf16: bool | None = None):
        """The prior with ``settings``' network options (``bf16`` overrides ``settings.dtype``)."""
        from klip_med.priors.diffusion import DiffusionPrior

        bf16 = settings.dtype == "bfloat16" if bf16 is None else bf16
        if settings.channels_last:
            self.prior.unet.to(memory_format=torch.channels_last)  # our own copy: same values, new layout
        unet = NetworkOptions(self.prior.unet, self.truth.device.type, bf16=bf16,
                              channels_last=settings.channels_last, compile_mode=settings.compiled,
                              compile_backend=settings.compile_backend)
        return DiffusionPrior(self.prior.config, unet=unet).eval()


def load_prior(name_or_path: str, image_size: int | None, device: str, seed: int = 0):
    """``(prior, trained)``: the prior as shipped, or an untrained one at ``image_size``.

    The untrained network has the prior's architecture and schedule with a seeded random init
    (drawn inside ``torch.random.fork_rng``, so the caller's global generator is untouched).
    """
    from klip_med import priors
    from klip_med.priors.diffusion import DiffusionPrior

    prior = priors.load(name_or_path, device=device)
    native = prior.config.image_size
    if image_size is None or image_size == native:
        return prior, True
    check_image_size(image_size, prior.config.architecture, prior.config.name)
    config = dataclasses.replace(prior.config, image_size=image_size,
                                 name=f"{prior.config.name}@{image_size}-random-init")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = DiffusionPrior(config)
    return fresh.to(device).eval().requires_grad_(False), False


def demo_truth(prior, size: int) -> tuple[Tensor, str]:
    """The prior modality's demo slice in prior units on a ``size`` x ``size`` grid, (H, W) float32.

    MR: the bundled TCGA-LGG FLAIR slice (128 x 128, with its volume's MR scale), resized
    (bilinear, antialiased) if ``size`` differs. CT: the bundled abdominal slice (no lesion)
    resampled to the working grid as ``klip-med demo`` does.
    """
    from klip_med.pipeline.demo import case_file

    rule = prior.config.intensity
    if prior.config.modality == "MR":
        with np.load(case_file("lgg_flair_demo.npz")) as data:
            model = torch.from_numpy(rule.to_model(data["flair"], float(data["volume_mr_scale"])))
        source = "lgg_flair_demo (TCGA-LGG FLAIR slice with a tumour)"
        if tuple(model.shape) != (size, size):
            model = torch.nn.functional.interpolate(model[None, None], size=(size, size), mode="bilinear",
                                                    antialias=True, align_corners=False)[0, 0]
            source += f", resized to {size}x{size}"
        return model.clamp(-1.0, 1.0), source
    from klip_med.io import read_dicom_series, working_grid

    volume = read_dicom_series(case_file("ct_abdomen_demo", "ct_slice.dcm"), derive_missing_uids=True)
    model = rule.to_model(working_grid(volume, (size, size)).pixels[0])
    return torch.from_numpy(model), f"ct_abdomen_demo (abdominal CT slice, no lesion) on a {size}x{size} grid"


def build_case(settings: BenchSettings) -> BenchCase:
    """Load the prior, measure the demo slice ``settings.batch`` times with ``settings.physics``."""
    from klip_med.physics import parse_physics

    prior, trained = load_prior(settings.prior, settings.image_size, settings.device, settings.seed)
    size = int(prior.image_shape[-1])
    spec = settings.physics or DEFAULT_PHYSICS[prior.config.modality]
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed)
    try:
        physics = parse_physics(spec, size, generator=gen, device=settings.device)
    except KLIPMedError as exc:
        raise KLIPMedError(f"--physics: {exc}") from None
    image, source = demo_truth(prior, size)
    truth = image.to(settings.device).reshape(1, 1, size, size).repeat(settings.batch, 1, 1, 1)
    with torch.no_grad():
        y = physics(truth)
    return BenchCase(prior, trained, truth, physics, spec, y, source)


def posterior_means(samples: Tensor, settings: BenchSettings, image_shape) -> Tensor:
    """(B*S, C, H, W) samples -> (B, C, H, W) per-slice posterior means."""
    return samples.reshape(settings.batch, settings.samples, *image_shape).mean(dim=1)


def psnr_db(estimate: Tensor, truth: Tensor, data_range: float = 2.0) -> float:
    """Mean over slices of the PSNR (dB) of (B, 1, H, W) ``estimate`` against ``truth``."""
    mse = (estimate.float() - truth.float()).square().flatten(1).mean(dim=1)
    return float((10.0 * torch.log10(data_range**2 / mse)).mean())
