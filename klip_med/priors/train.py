"""Train a diffusion prior on the ``train`` split of a manifest (or a training pack of it).

Epsilon-prediction DDPM loss (MONAI ``DDPMScheduler.add_noise``), AdamW with linear warm-up and
cosine decay (or a constant rate: ``final_lr_fraction=1``), an exponential moving average (EMA) of
the weights (the EMA is what gets exported), random augmentation on the device, a progress bar
with the loss, periodic checkpoints (every ``checkpoint_every`` steps and, if asked, every few
minutes), and exact resume: a run stopped after k steps and resumed continues the same loss curve
as an uninterrupted run (same device, same execution options), because the model, EMA, optimiser
and the random generator's state are all checkpointed. How the step executes (bf16 autocast,
``torch.compile``, channels-last, fused AdamW) is a :class:`~klip_med.priors.train_step.TrainOptions`.

Continuing a trained prior (``init_from``) starts the network and the EMA from its exported EMA
weights with a fresh optimiser (hence a new warm-up); the export then counts every step behind
its weights: ``steps_trained`` and ``train_seconds`` add up, ``runs`` lists each run, and
``loss.csv`` holds the earlier curve followed by this run's, on one step axis.

Checkpoints are safetensors (tensors) + JSON (everything else); no pickle anywhere.

Files in the output folder:
    config.json, weights.safetensors   the exported prior (EMA weights), loadable with ``load``
    checkpoint.json, ckpt-<step>.safetensors   the resumable state (4 float32 copies of the network)
    loss.csv                            step, mean training loss over the logging interval
``publish``: after every export the three exported files are also written as one tar file.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from klip_med._atomic import atomic_path
from klip_med.data.manifest import read_manifest
from klip_med.errors import KLIPMedError
from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
from klip_med.priors.diffusion import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DiffusionPrior,
    build_scheduler,
    read_state_dict,
    save_prior_dir,
)
from klip_med.priors.lineage import LOSS_FILE, continued_prior
from klip_med.priors.train_data import TrainData, prepare_training_data, read_train_pack
from klip_med.priors.train_step import TrainOptions, compile_network, make_optimizer, train_step

CHECKPOINT_FILE = "checkpoint.json"

__all__ = ["CHECKPOINT_FILE", "LOSS_FILE", "TrainData", "TrainOptions", "TrainSettings", "lr_at",
           "prepare_training_data", "train_prior"]


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


def lr_at(step: int, settings: TrainSettings) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of a run: linear warm-up over
    ``warmup_steps``, then a cosine from ``lr`` to ``lr * final_lr_fraction`` at ``steps``."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    floor = settings.final_lr_fraction
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class _State:
    """Model, EMA, optimiser and generator, with safetensors + JSON (de)serialisation."""

    def __init__(self, prior: DiffusionPrior, settings: TrainSettings, device: torch.device,
                 options: TrainOptions) -> None:
        self.prior = prior
        self.ema = AveragedModel(prior.unet, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay),
                                 use_buffers=True)
        self.opt = make_optimizer(prior.unet, settings, device, options)
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


def _export(out: Path, state: _State, config: PriorConfig, lineage: dict[str, Any],
            publish: Path | None) -> None:
    """The EMA weights, config and the whole loss curve (earlier runs first) into ``out``; and, with
    ``publish``, the same three files as one tar (written atomically)."""
    save_prior_dir(state.ema.module, config, out)
    offset = lineage["steps"]
    rows = [*lineage["rows"], *([offset + int(s), loss] for s, loss in state.history)]
    lines = "step,loss\n" + "".join(f"{int(s)},{loss:.6f}\n" for s, loss in rows)
    with atomic_path(out / LOSS_FILE) as tmp:
        tmp.write_text(lines, encoding="utf-8")
    if publish is not None:
        with atomic_path(publish) as tmp, tarfile.open(tmp, "w") as archive:
            for name in (CONFIG_FILE, WEIGHTS_FILE, LOSS_FILE):
                archive.add(out / name, arcname=f"{config.name}/{name}")


def _load_data(manifest, pack, data_root, settings: TrainSettings) -> TrainData:
    if (manifest is None) == (pack is None):
        raise KLIPMedError("training data: expected exactly one of --manifest and --pack, found "
                           + ("both" if manifest is not None else "neither"))
    if pack is not None:
        return read_train_pack(pack, settings)
    return prepare_training_data(read_manifest(manifest, data_root), settings)


def train_prior(
    manifest: str | Path | None,
    out: str | Path,
    settings: TrainSettings,
    data_root: str | Path | None = None,
    device: str = "cpu",
    stop_after: int | None = None,
    time_limit_s: float | None = None,
    init_from: str | Path | None = None,
    progress: bool = True,
    *,
    pack: str | Path | None = None,
    options: TrainOptions | None = None,
    checkpoint_minutes: float | None = None,
    publish: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) a prior; returns a summary dict. See the module docstring.

    Args:
        manifest: the data manifest (its ``train`` split is used); None with ``pack``.
        out: output folder. If it holds ``checkpoint.json``, training resumes from it (the
            settings must be the same, else :class:`KLIPMedError`).
        settings: the run's settings.
        data_root: root of the manifest's files (default ``$KLIP_MED_DATA_ROOT``).
        device: ``cpu`` or ``cuda``.
        stop_after: stop (with a checkpoint) after this many total steps, e.g. to split a run.
        time_limit_s: stop (with a checkpoint) once this much wall time has passed in this call.
        init_from: continue an exported prior (folder): network and EMA start from its weights.
        progress: show a progress bar.
        pack: a training pack (:func:`~klip_med.priors.train_data.write_train_pack`) instead of
            ``manifest``: the same images, without the data folder.
        options: how the step executes (default: bf16 autocast + channels-last on CUDA, eager).
        checkpoint_minutes: also checkpoint and export whenever this many minutes have passed
            since the last checkpoint (a killed run keeps its progress).
        publish: a tar file to (re)write with the exported prior after every export.
    """
    from tqdm.auto import tqdm

    wall_start = time.perf_counter()
    options = options or TrainOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KLIPMedError("device: expected a CUDA device for 'cuda', found none (use --device cpu)")
    publish = Path(publish) if publish is not None else None
    data = _load_data(manifest, pack, data_root, settings)
    size = int(data.images.shape[-1])
    config = PriorConfig(
        name=settings.name, modality=data.modality, image_size=size,
        architecture=default_architecture(tuple(settings.channels)),
        schedule=default_schedule(settings.num_train_timesteps), intensity=data.intensity,
        weights_dtype=settings.weights_dtype,
        description=f"DDPM epsilon prior trained by klip-med train on {data.provenance['manifest']} (train split)",
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with torch.random.fork_rng(devices=[]):  # seeded weight init without touching the caller's RNG
        torch.manual_seed(settings.seed)
        prior = DiffusionPrior(config)
    init, lineage = continued_prior(init_from, config)
    if init is not None:
        prior.unet.load_state_dict(init.unet.state_dict())
    prior = prior.to(dev)
    channels_last, bf16 = options.use_channels_last(dev), options.bf16(dev)
    if channels_last:
        prior = prior.to(memory_format=torch.channels_last)
    state = _State(prior, settings, dev, options)
    ckpt_meta_path = out / CHECKPOINT_FILE
    previous_seconds = 0.0
    calls: list[dict[str, Any]] = []  # the calls of this run before this one (exact resume)
    if ckpt_meta_path.is_file():
        meta = json.loads(ckpt_meta_path.read_text(encoding="utf-8"))
        if meta["settings"] != settings.to_dict():
            changed = sorted(k for k in meta["settings"] if meta["settings"][k] != settings.to_dict().get(k))
            raise KLIPMedError(
                f"{ckpt_meta_path}: expected the same settings to resume, found changes in {changed}; "
                "use a new --out folder or the original settings"
            )
        saved = meta.get("lineage")
        if saved is not None and init is not None and saved["continued_from"] != lineage["continued_from"]:
            raise KLIPMedError(f"{ckpt_meta_path}: expected to resume a run continuing "
                               f"{saved['continued_from']}, found --init-from {init_from}")
        lineage = saved or lineage
        calls = list(meta.get("calls", []))
        state.load(read_state_dict(out / meta["tensors"]), meta)
        previous_seconds = float(meta.get("train_seconds", 0.0))
    scheduler = build_scheduler(config)
    net = compile_network(prior.unet, options)
    images = data.images.to(dev)
    target = settings.steps if stop_after is None else min(settings.steps, stop_after)
    running = torch.zeros((), device=dev)
    running_count = 0
    first_step, rate_mark = state.step, None

    def rate() -> dict[str, Any]:
        if rate_mark is None or state.step - rate_mark[0] < 1:
            return {}
        steps_s = (state.step - rate_mark[0]) / (time.perf_counter() - rate_mark[1])
        return {"steps_per_second": round(steps_s, 3), "images_per_second": round(steps_s * settings.batch_size, 1),
                "first_step_seconds": round(rate_mark[2], 2)}

    def provenance(seconds: float) -> dict[str, Any]:
        recent = [loss for _, loss in state.history[-max(1, 1000 // settings.log_every):]]
        device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
        execution = options.describe(dev)
        run = {"steps": state.step, "seconds": round(seconds, 1), "device": device_name,
               "batch_size": settings.batch_size, "lr": settings.lr, "warmup_steps": settings.warmup_steps,
               "final_lr_fraction": settings.final_lr_fraction, "seed": settings.seed, **execution,
               "torch": torch.__version__, **rate(), "calls": [*calls, this_call()]}
        return {
            **data.provenance, "settings": settings.to_dict(), "steps_trained": lineage["steps"] + state.step,
            "final_loss": (float(np.mean(recent)) if recent else None),
            "train_seconds": round(lineage["seconds"] + seconds, 1),
            "device": device_name, "torch": torch.__version__, "python": sys.version.split()[0],
            "mixed_precision": execution["mixed_precision"],
            "init_from": str(init_from) if init_from else None,
            "continued_from": lineage["continued_from"], "runs": [*lineage["runs"], run],
        }

    def this_call() -> dict[str, Any]:
        return {"from_step": first_step, "to_step": state.step, **options.describe(dev), **rate()}

    def save(seconds: float) -> None:
        _save_checkpoint(out, state, settings, {"train_seconds": seconds, "lineage": lineage,
                                                "calls": [*calls, this_call()]})
        config.training = provenance(seconds)
        _export(out, state, config, lineage, publish)

    bar = tqdm(total=target, initial=state.step, disable=not progress, desc=settings.name, unit="step")
    prior.unet.train()
    stopped_early = False
    last_save = time.perf_counter()
    while state.step < target:
        now = time.perf_counter()
        if time_limit_s is not None and now - wall_start > time_limit_s:
            stopped_early = True
            break
        for group in state.opt.param_groups:
            group["lr"] = lr_at(state.step, settings)
        loss = train_step(net, prior.unet, state.opt, state.ema, scheduler, images, settings, state.gen,
                          bf16=bf16, channels_last=channels_last)
        state.step += 1
        running += loss
        running_count += 1
        if state.step == first_step + 1:  # the first step of a call compiles and warms up: not in the rate
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            rate_mark = (state.step, time.perf_counter(), time.perf_counter() - now)
        if state.step % settings.log_every == 0 or state.step == target:
            mean_loss = float(running) / running_count
            state.history.append([state.step, mean_loss])
            running.zero_()
            running_count = 0
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        bar.update(1)
        due = checkpoint_minutes is not None and time.perf_counter() - last_save >= 60.0 * checkpoint_minutes
        if (state.step % settings.checkpoint_every == 0 or due) and state.step < target:
            save(previous_seconds + time.perf_counter() - wall_start)
            last_save = time.perf_counter()
    bar.close()
    if running_count:
        state.history.append([state.step, float(running) / running_count])
    seconds = previous_seconds + time.perf_counter() - wall_start
    save(seconds)
    return {"out": str(out), "steps": state.step, "target": settings.steps, "stopped_early": stopped_early,
            "steps_trained": config.training["steps_trained"], "final_loss": config.training["final_loss"],
            "train_seconds": round(seconds, 1), "config": str(out / CONFIG_FILE),
            "published": str(publish) if publish else None, **rate()}
