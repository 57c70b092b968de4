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
    from klip_med.priors.train import TrainSettings, train_prior

    preset = dict(TRAIN_PRESETS.get(args.preset or "", {}))
    for key in ("flip_lr", "rotate_deg", "scale_jitter", "gain_jitter", "offset_jitter"):
        value = getattr(args, key)
        if value is not None:
            preset[key] = value
    settings = TrainSettings(
        name=args.name or args.preset or Path(args.out).name, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, ema_decay=args.ema_decay, seed=args.seed, warmup_steps=min(args.warmup, args.steps),
        channels=tuple(int(c) for c in args.channels.split(",")), checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, weights_dtype=args.weights_dtype,
        final_lr_fraction=args.final_lr_fraction, **preset,
    )
    summary = train_prior(
        args.manifest, args.out, settings, data_root=args.data_root, device=args.device,
        stop_after=args.stop_after, time_limit_s=(args.time_limit_min * 60 if args.time_limit_min else None),
        init_from=args.init_from, progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=1))
    return 0


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
    train.add_argument("--manifest", required=True, help="data manifest JSON (see data_manifests/)")
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
    train.add_argument("--channels", default="32,64,128,128", help="UNet channels per level")
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
    train.add_argument("--init-from", help="warm-start from an exported prior folder")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=run_command)
    return train
