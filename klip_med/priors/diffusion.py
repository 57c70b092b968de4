"""A learned diffusion prior: MONAI ``DiffusionModelUNet`` + MONAI ``DDPMScheduler`` schedule.

:class:`DiffusionPrior` satisfies the samplers' ``EpsilonPrior`` protocol: ``eps(x_t, t)`` with
``x_t`` (B, 1, H, W) in [-1, 1]-scaled image units and ``t`` (B,) fractional training timesteps.

Weights live in a folder (or are named by a ``.safetensors`` path) next to ``config.json``; only
safetensors are read, never pickle. :func:`load_prior_dir` validates the config, the tensor names,
shapes and dtypes against the network the config describes, and refuses anything else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import Tensor, nn

from klip_med._atomic import atomic_path
from klip_med.errors import KLIPMedError
from klip_med.priors.config import PriorConfig

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def build_unet(config: PriorConfig) -> nn.Module:
    """The MONAI UNet the config describes (random init)."""
    try:
        return DiffusionModelUNet(**config.architecture)
    except (ValueError, TypeError) as exc:
        raise KLIPMedError(f"architecture: MONAI refused {config.architecture}: {exc}") from None


def build_scheduler(config: PriorConfig) -> DDPMScheduler:
    """The MONAI DDPM scheduler of the config (its ``alphas_cumprod`` is the prior's schedule)."""
    sched = config.schedule
    return DDPMScheduler(
        num_train_timesteps=sched["num_train_timesteps"], schedule=sched["schedule"],
        beta_start=sched["beta_start"], beta_end=sched["beta_end"],
    )


class DiffusionPrior(nn.Module):
    """An epsilon-prediction VP prior (MONAI UNet + DDPM schedule) for the posterior samplers.

    Args:
        config: the validated config.
        unet: the network; built from the config when None.

    Attributes:
        alphas_cumprod: (T,) float64 on CPU, the DDPM ``alpha_bar_t``.
        config: the config (intensity rule, provenance).
    """

    def __init__(self, config: PriorConfig, unet: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.unet = build_unet(config) if unet is None else unet
        self.alphas_cumprod = build_scheduler(config).alphas_cumprod.to(torch.float64).cpu()
        self.channels_last = False
        self.bf16 = False

    def set_execution(self, *, channels_last: bool = False, bf16: bool = False) -> DiffusionPrior:
        """How the network runs (both off by default: float32, contiguous layout, every published number).

        Args:
            channels_last: keep weights and activations in channels-last layout, oneDNN's native
                CPU layout. Same float32 arithmetic in another order: on the demo slice the KLIP
                maps moved by at most 1e-4 (relative L2, any window) and the image score not in its
                first 5 digits; a series took 0.92x the time on a 2-core CPU (``docs/batch.md``).
            bf16: autocast the network to bfloat16 (the output is cast back to float32). For CPUs
                with bf16 units (AMX / AVX512-BF16: a series took 0.65x the time) and GPUs; where
                PyTorch emulates bf16 it may be slower (not measured). On the demo slice it moved the
                headline map by 0.5 % (relative L2; 8 % in the noisiest window t:0.9,1; another seed
                moves them by 40-83 %), block densities by up to 3 % and the image score by -0.3 %
                (``docs/batch.md``).

        Returns:
            this prior (changed in place).
        """
        self.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.channels_last, self.bf16 = bool(channels_last), bool(bf16)
        return self

    def execution(self) -> dict[str, bool]:
        """The opt-in execution options in force (``{}`` by default), for fingerprints and summaries."""
        return {k: True for k in ("channels_last", "bf16") if getattr(self, k)}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the prior was trained on."""
        size = self.config.image_size
        return (self.config.architecture["in_channels"], size, size)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted noise, (B, C, H, W), for ``x_t`` (B, C, H, W) at timesteps ``t`` (B,)."""
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != self.image_shape:
            raise KLIPMedError(
                f"x_t: expected shape (B, {', '.join(map(str, self.image_shape))}) for prior "
                f"{self.config.name!r}, found {tuple(x_t.shape)}"
            )
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x_t.shape[0])
        if not (self.channels_last or self.bf16):
            return self.unet(x_t, t)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.unet(x_t, t)
        return out.to(torch.float32).contiguous()

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.eps(x_t, t)


def _check_safetensors_file(path: Path) -> None:
    """Refuse anything that is not a safetensors file (e.g. a pickle renamed)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        raise KLIPMedError(f"{path}: expected a safetensors file, found {len(head)} bytes")
    header_len = int.from_bytes(head[:8], "little")
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80" or head[:2] == b"PK" or not (
        0 < header_len < _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"
    ):
        raise KLIPMedError(
            f"{path}: expected a safetensors file (8-byte header length then JSON), found something else "
            "(pickled / torch.save checkpoints are refused; convert with safetensors.torch.save_file)"
        )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a safetensors file, with a clear error for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise KLIPMedError(f"weights: expected a .safetensors file, found none at {path}")
    _check_safetensors_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise KLIPMedError(f"{path}: expected readable safetensors, found: {exc}") from None


def load_prior_dir(folder: str | Path, device: str | torch.device = "cpu") -> DiffusionPrior:
    """Load ``config.json`` + ``weights.safetensors`` from a folder into an eval-mode prior (float32).

    A path to the ``.safetensors`` file itself is accepted too (the config must sit beside it).
    """
    folder = Path(folder)
    weights = folder if folder.suffix == ".safetensors" else folder / WEIGHTS_FILE
    config = PriorConfig.read(weights.parent / CONFIG_FILE)
    tensors = read_state_dict(weights)
    prior = DiffusionPrior(config)
    expected = prior.unet.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise KLIPMedError(
            f"{weights}: expected the tensors of the architecture in {CONFIG_FILE}, found "
            f"{len(missing)} missing (e.g. {missing[:2]}) and {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for key, ref in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise KLIPMedError(
                f"{weights}: tensor {key}: expected shape {tuple(ref.shape)} from {CONFIG_FILE}, "
                f"found {tuple(got.shape)}"
            )
        if str(got.dtype).removeprefix("torch.") != config.weights_dtype:
            raise KLIPMedError(
                f"{weights}: tensor {key}: expected dtype {config.weights_dtype} (config), found {got.dtype}"
            )
        if not torch.isfinite(got).all():
            raise KLIPMedError(f"{weights}: tensor {key}: expected finite values, found NaN or inf")
    prior.unet.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    return prior.to(device).eval().requires_grad_(False)


def save_prior_dir(prior_or_unet: nn.Module, config: PriorConfig, folder: str | Path) -> Path:
    """Write ``weights.safetensors`` (in ``config.weights_dtype``) and ``config.json``, atomically."""
    from safetensors.torch import save_file

    unet = prior_or_unet.unet if isinstance(prior_or_unet, DiffusionPrior) else prior_or_unet
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, config.weights_dtype)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config.to_dict(), indent=1) + "\n", encoding="utf-8")
    return folder
