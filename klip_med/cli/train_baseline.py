"""``klip-med train-baseline``: train the companion model a baseline of ``klip-med eval`` needs.

- ``--kind dlsr``: the feature-space denoiser of DLSR (:mod:`klip_med.eval.dlsr`) on the prior's UNet
  features of ``--slices`` healthy train-split slices.
- ``--kind diffguard``: the noise-aware anatomical-level classifier of DiffGuard
  (:mod:`klip_med.eval.diffguard`, :mod:`klip_med.eval.levels`) on the healthy train-split slices,
  then measured on the healthy slices of the dev split (never trained on).

Only the manifest's ``train`` split is trained on. The result is a companion folder (config.json +
weights.safetensors) that ``klip-med eval`` finds at ``<prior folder>/<kind>/`` (the default ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys


def run_command(args: argparse.Namespace) -> int:
    import torch

    from klip_med.data.manifest import read_manifest
    from klip_med.eval.companions import companion_dir
    from klip_med.priors import load

    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.manifest, args.data_root)
    prior = load(args.prior)
    out = args.out or companion_dir(args.prior, args.kind)
    generator = torch.Generator().manual_seed(args.seed)
    limit = args.time_limit_min * 60 if args.time_limit_min else None

    def say(message: str) -> None:
        print(message, flush=True)  # a log file shows progress
    provenance = {"command": "klip-med " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["train-baseline"] else None,
                  "manifest": manifest.name, "manifest_sha256": manifest.sha256(), "split": "train",
                  "licence": manifest.licence, "seed": args.seed, "threads": args.threads, "device": "cpu",
                  "torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or
                  platform.machine()}
    if args.kind == "dlsr":
        from klip_med.eval.dlsr import save_dlsr, train_dlsr
        from klip_med.eval.features import training_slices

        images = training_slices(manifest, prior, args.slices or 384)
        model, record = train_dlsr(prior, images, generator, steps=args.steps or 4000, batch=args.batch or 1024,
                                   lr=args.lr or 1e-3, time_limit_s=limit, log=say)
        save_dlsr(model, out, prior, {**provenance, **record})
    else:
        from klip_med.eval.diffguard import save_diffguard
        from klip_med.eval.levels import level_accuracy, level_data, train_level_classifier

        data = level_data(manifest, prior, "train", args.levels, max_slices=args.slices)
        net, record = train_level_classifier(data, prior.alphas_cumprod, generator, n_levels=args.levels,
                                             steps=args.steps or 3000, batch=args.batch or 64, lr=args.lr or 2e-3,
                                             flip_lr=prior.config.modality == "MR", time_limit_s=limit, log=say)
        record["level_rule"] = f"min(n - 1, floor(n (i + 0.5) / S)), n = {args.levels} (klip_med.eval.levels)"
        evaluation = {}
        for split in ("train", "dev"):
            held = data if split == "train" else level_data(manifest, prior, "dev", args.levels)
            evaluation[split] = level_accuracy(net, held, prior.alphas_cumprod, torch.Generator().manual_seed(1))
            say(f"diffguard: {split} accuracy {json.dumps(evaluation[split])}")
        save_diffguard(net, out, prior, {**provenance, **record, "accuracy": evaluation})
    print(f"wrote {out}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``train-baseline`` on the ``klip-med`` subparsers."""
    p = sub.add_parser(
        "train-baseline",
        help="train the companion model of the dlsr or diffguard baseline of `klip-med eval` (CPU)",
        description=(
            "Train, on the healthy slices of a manifest's train split, the small model a baseline needs: "
            "dlsr (a denoiser of the prior's UNet features) or diffguard (a noise-aware anatomical-level "
            "classifier used for classifier guidance). Writes config.json + weights.safetensors to OUT "
            "(default: the prior's folder / KIND, where `klip-med eval` looks)."
        ),
    )
    p.add_argument("--kind", required=True, choices=("dlsr", "diffguard"))
    p.add_argument("--prior", required=True, help="shipped prior name or prior folder")
    p.add_argument("--manifest", required=True, help="data manifest JSON (its train split is used)")
    p.add_argument("--data-root", help="root of the manifest's files (default $KLIP_MED_DATA_ROOT)")
    p.add_argument("--out", help="output folder (default: <prior folder>/<kind>)")
    p.add_argument("--steps", type=int, help="optimiser steps (default dlsr 4000, diffguard 3000)")
    p.add_argument("--batch", type=int, help="batch (default dlsr 1024 feature vectors, diffguard 64 slices)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default dlsr 1e-3, diffguard 2e-3)")
    p.add_argument("--slices", type=int, help="training slices, evenly spaced (default dlsr 384, diffguard all)")
    p.add_argument("--levels", type=int, default=6, help="diffguard: anatomical level bins (default 6)")
    p.add_argument("--time-limit-min", type=float, help="stop training after this many minutes")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_command)
    return p
