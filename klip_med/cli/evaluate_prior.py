"""``klip-med evaluate-prior``: measure a prior on held-out healthy slices (numbers for its model card)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run_command(args: argparse.Namespace) -> int:
    import torch

    from klip_med.data.manifest import read_manifest
    from klip_med.priors import load
    from klip_med.priors.evaluate import (
        denoising_error,
        heldout_healthy_slices,
        reconstruction_quality,
        sample_figure,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = load(args.prior, device=args.device)
    manifest = read_manifest(args.manifest, args.data_root)
    images, names = heldout_healthy_slices(manifest, prior, args.slices)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    report = {"prior": prior.config.name, "manifest": manifest.name, "slices": names, "seed": args.seed,
              "device": args.device, "denoising": denoising_error(prior, images, gen), "reconstruction": []}
    print(f"{prior.config.name} on {len(names)} held-out healthy slices of {manifest.name}")
    print("| t | sigma | x0 MSE ([-1,1] units) | eps MSE |\n|---|---|---|---|")
    for row in report["denoising"]:
        print(f"| {row['t']} | {row['sigma']} | {row['x0_mse']:.5f} | {row['eps_mse']:.4f} |")
    print("| physics | posterior mean PSNR / SSIM | baseline PSNR / SSIM | seconds |\n|---|---|---|---|")
    for spec in args.physics:
        res = reconstruction_quality(prior, images, spec, gen, n_samples=args.samples, n_steps=args.steps)
        report["reconstruction"].append(res)
        print(f"| {spec} | {res['psnr_posterior_mean']:.2f} dB / {res['ssim_posterior_mean']:.3f} | "
              f"{res['psnr_baseline']:.2f} dB / {res['ssim_baseline']:.3f} | {res['seconds']} |", flush=True)
    if args.figure:
        sample_figure(prior, images, out / "samples.png", gen, n=8, n_steps=args.figure_steps)
    (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out / 'metrics.json'}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``evaluate-prior`` on the ``klip-med`` subparsers."""
    evaluate = sub.add_parser(
        "evaluate-prior",
        help="measure a prior on held-out healthy slices",
        description=(
            "Denoising MSE at a few noise levels, and PSNR / SSIM of the fast sampler's posterior mean "
            "against the zero-filled / FBP baseline, on held-out (dev + test) lesion-free slices of a "
            "manifest; optionally a figure of unconditional samples next to real slices."
        ),
    )
    evaluate.add_argument("--prior", required=True, help="shipped prior name or folder")
    evaluate.add_argument("--manifest", required=True)
    evaluate.add_argument("--data-root")
    evaluate.add_argument("--physics", nargs="+", required=True,
                          help="operator specs, e.g. mri:accel=4,center=0.08,noise=0.01 ct-sparse:views=60")
    evaluate.add_argument("--slices", type=int, default=6)
    evaluate.add_argument("--samples", type=int, default=4)
    evaluate.add_argument("--steps", type=int, default=50)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--figure", action="store_true", help="also write samples.png")
    evaluate.add_argument("--figure-steps", type=int, default=100)
    evaluate.add_argument("--out", required=True, help="folder for metrics.json (and samples.png)")
    evaluate.set_defaults(run=run_command)
    return evaluate
