"""Train a diffusion prior on the ``train`` split of a manifest.

Epsilon-prediction DDPM loss (MONAI ``DDPMScheduler.add_noise``), AdamW with linear warm-up and
cosine decay, an exponential moving average (EMA) of the weights (the EMA is what gets exported),
bf16 autocast + channels-last on CUDA, random augmentation on the device, a progress bar with the
loss, periodic checkpoints, and exact resume: a run stopped after k steps and resumed continues the
same loss curve as an uninterrupted run (same device), because the model, EMA, optimiser and the
random generator's state are all checkpointed.

Checkpoints are safetensors (tensors) + JSON (everything else); no pickle anywhere.

Files in the output folder:
    config.json, weights.safetensors   the exported prior (EMA weights), loadable with ``load``
    checkpoint.json, ckpt-<step>.safetensors   the resumable state
    loss.csv                            step, mean training loss over the logging interval
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from klip_med._atomic import atomic_path
from klip_med.data.manifest import Manifest, read_manifest
from klip_med.errors import KLIPMedError
from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
from klip_med.priors.diffusion import (
    CONFIG_FILE,
    DiffusionPrior,
    build_scheduler,
    load_prior_dir,
    read_state_dict,
    save_prior_dir,
)
from klip_med.priors.intensity import ABDOMEN_WINDOW, IntensityRule

CHECKPOINT_FILE = "checkpoint.json"


@dataclass
class TrainSettings:
    """Everything that defines a training run (stored in the checkpoint; resume must match).

    Attributes:
        name: the prior's name (e.g. ``mri-brain-flair-128``).
        steps: total optimiser steps.
        batch_size: images per step.
        lr: peak AdamW learning rate; ``warmup_steps`` linear warm-up, then cosine decay to
            ``lr * final_lr_fraction``.
        ema_decay: EMA decay per step.
        channels: UNet channels per level (attention at the lowest level).
        flip_lr: random left-right flips (brain MRI yes; abdominal CT no: anatomy is not symmetric).
        rotate_deg, scale_jitter: random in-plane rotation (degrees, uniform +-) and zoom (+- fraction).
        gain_jitter, offset_jitter: random intensity gain (+- fraction) and offset (+- in [-1, 1] units).
        weights_dtype: dtype of the exported weights.
        seed: seeds the one generator all randomness comes from.
    """

    name: str
    steps: int = 20000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 500
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    channels: tuple[int, ...] = (32, 64, 128, 128)
    num_train_timesteps: int = 1000
    flip_lr: bool = False
    rotate_deg: float = 0.0
    scale_jitter: float = 0.0
    gain_jitter: float = 0.0
    offset_jitter: float = 0.0
    weights_dtype: str = "float16"
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    mr_percentile: float = 99.5

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels"] = list(self.channels)
        return out


@dataclass
class TrainData:
    """Training images in the prior's range, (N, 1, H, W) float32, and the rule that made them."""

    images: Tensor
    intensity: IntensityRule
    provenance: dict[str, Any] = field(default_factory=dict)


def prepare_training_data(manifest: Manifest, settings: TrainSettings) -> TrainData:
    """Load the manifest's ``train`` split and map it to [-1, 1] by the modality's rule.

    CT: the abdominal window (W400/L40). MR: each file (a patient's volume) is scaled by its own
    percentile of non-zero voxels (over all its slices), to a reference equal to the median of that
    percentile over the training volumes, so typical training volumes keep their published scale.
    """
    items = manifest.split("train")
    if not items:
        raise KLIPMedError(f"{manifest.source}: expected a 'train' split, found none")
    if manifest.modality == "CT":
        stack, _, _ = manifest.load_slices("train")
        rule = ABDOMEN_WINDOW
        images = rule.to_model(stack.astype(np.float32))
    else:
        volumes, selections = [], []
        for item in items:
            with np.load(item.path) as data:
                volume = data[manifest.array_key].astype(np.float32)
            volumes.append(volume)
            selections.append(item.slice_indices(volume.shape[0]))
        levels = [float(np.percentile(v[v > 0], settings.mr_percentile)) for v in volumes]
        peak = 255.0 if all(v.max() <= 255 for v in volumes) else max(float(v.max()) for v in volumes)
        reference = float(np.clip(np.median(levels) / peak, 1e-3, 1.0))
        rule = IntensityRule("mr-percentile", percentile=settings.mr_percentile, reference=round(reference, 4))
        images = np.concatenate([rule.to_model(v, rule.mr_scale(v))[idx] for v, idx in zip(volumes, selections,
                                                                                            strict=True)])
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise KLIPMedError(f"{manifest.source}: expected square slices (N, H, H), found {images.shape}")
    provenance = {
        "manifest": manifest.name,
        "manifest_file": manifest.source.name,
        "manifest_sha256": manifest.sha256(),
        "split": "train",
        "n_slices": int(images.shape[0]),
        "files": sorted({(item.relative, item.sha256) for item in items}),
        "licence": manifest.licence,
    }
    return TrainData(torch.from_numpy(images[:, None].copy()), rule, provenance)


def augment(batch: Tensor, settings: TrainSettings, gen: torch.Generator) -> Tensor:
    """Random flips / rotation / zoom / intensity jitter of a (B, 1, H, W) batch in [-1, 1].

    Geometric changes resample bilinearly with the background value -1 outside the image.
    All draws come from ``gen`` in a fixed order (exact resume).
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


def _lr_at(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    floor = settings.final_lr_fraction
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class _State:
    """Model, EMA, optimiser and generator, with safetensors + JSON (de)serialisation."""

    def __init__(self, prior: DiffusionPrior, settings: TrainSettings, device: torch.device) -> None:
        self.prior = prior
        self.ema = AveragedModel(prior.unet, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay),
                                 use_buffers=True)
        self.opt = torch.optim.AdamW(prior.unet.parameters(), lr=settings.lr,
                                     weight_decay=settings.weight_decay)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(settings.seed)
        self.step = 0
        self.history: list[list[float]] = []

    def tensors(self) -> dict[str, Tensor]:
        out = {f"model.{k}": v for k, v in self.prior.unet.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for index, slot in self.opt.state_dict()["state"].items():
            for name, value in slot.items():
                out[f"opt.{index}.{name}"] = torch.as_tensor(value)
        out["generator"] = self.gen.get_state()
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.prior.unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        opt_state = self.opt.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        opt_state["state"] = state
        opt_state["param_groups"] = meta["param_groups"]
        self.opt.load_state_dict(opt_state)
        self.gen.set_state(tensors["generator"])
        self.step = int(meta["step"])
        self.history = [list(row) for row in meta["history"]]


def _save_checkpoint(out: Path, state: _State, settings: TrainSettings, extra: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    name = f"ckpt-{state.step:08d}.safetensors"
    tensors = state.tensors()
    with atomic_path(out / name) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "step": state.step, "tensors": name, "settings": settings.to_dict(),
        "param_groups": state.opt.state_dict()["param_groups"], "history": state.history, **extra,
    }
    with atomic_path(out / CHECKPOINT_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    for old in out.glob("ckpt-*.safetensors"):
        if old.name != name:
            old.unlink()


def _export(out: Path, state: _State, config: PriorConfig) -> None:
    save_prior_dir(state.ema.module, config, out)
    lines = "step,loss\n" + "".join(f"{int(s)},{loss:.6f}\n" for s, loss in state.history)
    with atomic_path(out / "loss.csv") as tmp:
        tmp.write_text(lines, encoding="utf-8")


def train_prior(
    manifest: str | Path,
    out: str | Path,
    settings: TrainSettings,
    data_root: str | Path | None = None,
    device: str = "cpu",
    stop_after: int | None = None,
    time_limit_s: float | None = None,
    init_from: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a prior; returns a summary dict. See the module docstring.

    Args:
        manifest: the data manifest (its ``train`` split is used).
        out: output folder. If it holds ``checkpoint.json``, training resumes from it (the
            settings must be the same, else :class:`KLIPMedError`).
        settings: the run's settings.
        data_root: root of the manifest's files (default ``$KLIP_MED_DATA_ROOT``).
        device: ``cpu`` or ``cuda``.
        stop_after: stop (with a checkpoint) after this many total steps, e.g. to split a run.
        time_limit_s: stop (with a checkpoint) once this much wall time has passed in this call.
        init_from: warm-start the network (and EMA) from an exported prior folder.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    wall_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KLIPMedError("device: expected a CUDA device for 'cuda', found none (use --device cpu)")
    manifest_obj = read_manifest(manifest, data_root)
    data = prepare_training_data(manifest_obj, settings)
    size = int(data.images.shape[-1])
    config = PriorConfig(
        name=settings.name, modality=manifest_obj.modality, image_size=size,
        architecture=default_architecture(tuple(settings.channels)),
        schedule=default_schedule(settings.num_train_timesteps), intensity=data.intensity,
        weights_dtype=settings.weights_dtype,
        description=f"DDPM epsilon prior trained by klip-med train on {manifest_obj.name} (train split)",
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with torch.random.fork_rng(devices=[]):  # seeded weight init without touching the caller's RNG
        torch.manual_seed(settings.seed)
        prior = DiffusionPrior(config)
    if init_from is not None:
        prior.unet.load_state_dict(load_prior_dir(init_from).unet.state_dict())
    prior = prior.to(dev)
    if dev.type == "cuda":
        prior = prior.to(memory_format=torch.channels_last)
    state = _State(prior, settings, dev)
    ckpt_meta_path = out / CHECKPOINT_FILE
    previous_seconds = 0.0
    if ckpt_meta_path.is_file():
        meta = json.loads(ckpt_meta_path.read_text(encoding="utf-8"))
        if meta["settings"] != settings.to_dict():
            changed = sorted(k for k in meta["settings"] if meta["settings"][k] != settings.to_dict().get(k))
            raise KLIPMedError(
                f"{ckpt_meta_path}: expected the same settings to resume, found changes in {changed}; "
                "use a new --out folder or the original settings"
            )
        state.load(read_state_dict(out / meta["tensors"]), meta)
        previous_seconds = float(meta.get("train_seconds", 0.0))
    scheduler = build_scheduler(config)
    images = data.images.to(dev)
    n = images.shape[0]
    target = settings.steps if stop_after is None else min(settings.steps, stop_after)
    use_amp = dev.type == "cuda"
    running = torch.zeros((), device=dev)
    running_count = 0

    def provenance(seconds: float) -> dict[str, Any]:
        recent = [loss for _, loss in state.history[-max(1, 1000 // settings.log_every):]]
        return {
            **data.provenance, "settings": settings.to_dict(), "steps_trained": state.step,
            "final_loss": (float(np.mean(recent)) if recent else None),
            "train_seconds": round(seconds, 1),
            "device": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"),
            "torch": torch.__version__, "python": sys.version.split()[0],
            "mixed_precision": "bf16 autocast" if use_amp else "float32",
            "init_from": str(init_from) if init_from else None,
        }

    bar = tqdm(total=target, initial=state.step, disable=not progress, desc=settings.name, unit="step")
    prior.unet.train()
    stopped_early = False
    while state.step < target:
        if time_limit_s is not None and time.perf_counter() - wall_start > time_limit_s:
            stopped_early = True
            break
        for group in state.opt.param_groups:
            group["lr"] = _lr_at(state.step, settings)
        idx = torch.randint(0, n, (settings.batch_size,), generator=state.gen, device=dev)
        x0 = augment(images[idx], settings, state.gen)
        noise = torch.randn(x0.shape, generator=state.gen, device=dev)
        t = torch.randint(0, settings.num_train_timesteps, (x0.shape[0],), generator=state.gen, device=dev)
        x_t = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        if dev.type == "cuda":
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = prior.unet(x_t, t)
        loss = F.mse_loss(pred.float(), noise)
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        state.opt.step()
        state.ema.update_parameters(prior.unet)
        state.step += 1
        running += loss.detach()
        running_count += 1
        if state.step % settings.log_every == 0 or state.step == target:
            mean_loss = float(running) / running_count
            state.history.append([state.step, mean_loss])
            running.zero_()
            running_count = 0
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        bar.update(1)
        if state.step % settings.checkpoint_every == 0 and state.step < target:
            seconds = previous_seconds + time.perf_counter() - wall_start
            _save_checkpoint(out, state, settings, {"train_seconds": seconds})
            config.training = provenance(seconds)
            _export(out, state, config)
    bar.close()
    if running_count:
        state.history.append([state.step, float(running) / running_count])
    seconds = previous_seconds + time.perf_counter() - wall_start
    _save_checkpoint(out, state, settings, {"train_seconds": seconds})
    config.training = provenance(seconds)
    _export(out, state, config)
    return {"out": str(out), "steps": state.step, "target": settings.steps, "stopped_early": stopped_early,
            "final_loss": config.training["final_loss"], "train_seconds": round(seconds, 1),
            "config": str(out / CONFIG_FILE)}
