"""``klip-med train``: train a diffusion prior on a manifest's train split (resumable)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_PRESETS = {
    # Brain MRI: left-right flips are fine (the brain is nearly symmetric), mild geometry / gain jitter.
    "mri-brain-flair-128": dict(flip_lr=True, rotate_deg=5.0, scale_jitter=0.05, gain_jitter=0.05),
    # Abdominal CT, one patient: no flips (anatomy is not symmetric), small rotations and zoom,
    # +-3% gain and +-0.05 offset (10 HU) in the window.
    "ct-abdomen-128": dict(flip_lr=False, rotate_deg=5.0, scale_jitter=0.05, gain_jitter=0.03, offset_jitter=0.05),
}


def run_command(args: argparse.Namespace) -> int:
    from klip_med.priors.train import TrainOptions, TrainSettings, train_prior

    preset = dict(TRAIN_PRESETS.get(args.preset or "", {}))
    for key in ("flip_lr", "rotate_deg", "scale_jitter", "gain_jitter", "offset_jitter"):
        value = getattr(args, key)
        if value is not None:
            preset[key] = value
    init = _init_network(args.init_from)
    channels = args.channels or init.pop("channels", "32,64,128,128")
    settings = TrainSettings(
        name=args.name or args.preset or Path(args.out).name, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, ema_decay=args.ema_decay, seed=args.seed, warmup_steps=min(args.warmup, args.steps),
        channels=tuple(int(c) for c in channels.split(",")), checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, weights_dtype=args.weights_dtype,
        final_lr_fraction=args.final_lr_fraction, **init, **preset,
    )
    options = TrainOptions(precision=args.precision, compile_mode=(args.compile_mode if args.compile else None),
                           compile_backend=args.compile_backend, fused_adam=args.fused_adam)
    summary = train_prior(
        args.manifest, args.out, settings, data_root=args.data_root, device=args.device,
        stop_after=args.stop_after, time_limit_s=(args.time_limit_min * 60 if args.time_limit_min else None),
        init_from=args.init_from, progress=not args.no_progress, pack=args.pack, options=options,
        checkpoint_minutes=args.checkpoint_minutes, publish=args.publish,
    )
    print(json.dumps(summary, indent=1))
    return 0


def _init_network(init_from: str | None) -> dict:
    """The UNet channels and training timesteps of the prior ``--init-from`` names (continuing a
    prior needs neither flag); empty without ``--init-from``."""
    if not init_from:
        return {}
    from klip_med.priors.config import PriorConfig

    folder = Path(init_from) if Path(init_from).is_dir() else Path(init_from).parent
    config = PriorConfig.read(folder / "config.json")
    return {"channels": ",".join(str(c) for c in config.architecture["channels"]),
            "num_train_timesteps": int(config.schedule["num_train_timesteps"])}


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``train`` on the ``klip-med`` subparsers."""
    train = sub.add_parser(
        "train",
        help="train a diffusion prior on a manifest's train split",
        description=(
            "Train an epsilon-prediction DDPM prior (MONAI DiffusionModelUNet, linear-beta schedule) on "
            "the 'train' split of a data manifest. EMA weights are exported to OUT as config.json + "
            "weights.safetensors (load with klip_med.priors.load(OUT)). Rerunning with the same OUT "
            "and settings resumes from the last checkpoint."
        ),
    )
    data = train.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", help="data manifest JSON (see data_manifests/)")
    data.add_argument("--pack", help="training pack (.npz) made from a manifest's train split: the same "
                                     "images without the data folder (examples/gpu_session.py pack)")
    train.add_argument("--out", required=True, help="output folder (resumes if it holds a checkpoint)")
    train.add_argument("--data-root", help="root of the manifest's files (default $KLIP_MED_DATA_ROOT)")
    train.add_argument("--preset", choices=sorted(TRAIN_PRESETS), help="augmentation preset of a shipped prior")
    train.add_argument("--name", help="prior name (default: the preset or the OUT folder name)")
    train.add_argument("--device", default="cpu", help="cpu or cuda")
    train.add_argument("--steps", type=int, default=20000, help="total optimiser steps")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    train.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    train.add_argument("--final-lr-fraction", type=float, default=0.1,
                       help="cosine decay ends at lr times this (1 = constant lr after warm-up, as in Ho et al.)")
    train.add_argument("--ema-decay", type=float, default=0.999)
    train.add_argument("--channels", default=None,
                       help="UNet channels per level (default: those of --init-from, else 32,64,128,128)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=1000)
    train.add_argument("--log-every", type=int, default=50)
    train.add_argument("--weights-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    train.add_argument("--flip-lr", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                       help="random left-right flips (true/false; overrides the preset)")
    train.add_argument("--rotate-deg", type=float, default=None)
    train.add_argument("--scale-jitter", type=float, default=None)
    train.add_argument("--gain-jitter", type=float, default=None)
    train.add_argument("--offset-jitter", type=float, default=None)
    train.add_argument("--stop-after", type=int, help="checkpoint and stop after this many total steps")
    train.add_argument("--time-limit-min", type=float, help="checkpoint and stop after this many minutes")
    train.add_argument("--init-from", help="continue an exported prior folder: network and EMA start from its "
                                           "weights (fresh optimiser); steps, seconds and loss.csv add up")
    train.add_argument("--precision", default="auto", choices=["auto", "bf16", "float32"],
                       help="auto: bf16 autocast on CUDA, float32 on CPU (default); bf16 or float32 anywhere")
    train.add_argument("--compile", action="store_true", help="torch.compile the network (first step compiles)")
    train.add_argument("--compile-mode", default="default",
                       choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                       help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    train.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                       help="torch.compile backend; aot_eager / eager only trace (dry runs on a CPU)")
    train.add_argument("--fused-adam", action="store_true", help="AdamW's fused kernel")
    train.add_argument("--checkpoint-minutes", type=float,
                       help="also checkpoint and export every this many minutes (a killed run keeps its progress)")
    train.add_argument("--publish", help="after every export, also write the exported prior as this tar file")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=run_command)
    return train
