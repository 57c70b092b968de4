"""The ``klip-med`` command.

Subcommands:
    demo     a bundled real case (brain MRI with a tumour, or abdominal CT with an inserted lesion)
             undersampled, reconstructed with a shipped prior, scored, written as PNG/NIfTI/DICOM
    run      the same for your own DICOM series / NIfTI / .npz volume (slice by slice, resumable)
    verify   prove the KLIP estimator on this install against a closed-form Gaussian case
    train    train a diffusion prior on a data manifest (resumable)
    priors   list the shipped priors and their model cards
    evaluate-prior   measure a prior on held-out healthy slices (numbers for its model card)
    calibrate  fit a null model on in-distribution data: KLIP z-scores, p-values, a calibrated SEG threshold
    bench    time posterior sampling with KLIP: overhead, memory, deepinv and stored-trajectory comparisons

Exit codes:
    0    success
    1    internal error (a bug: the traceback is printed), or the operating system refused
         (disk full, permission denied: one line)
    2    user error: a bad argument, a missing / unreadable input, an unknown prior, a malformed
         physics string, an output folder that is a file, ... (one line naming the problem;
         ``--debug`` shows the traceback). argparse's own usage errors exit 2 too.
    130  interrupted (Ctrl-C); ``run`` resumes where it stopped when rerun with the same arguments
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from klip_med import __version__
from klip_med.errors import KLIPMedError, expect


def _verify(args: argparse.Namespace) -> int:
    from klip_med.analytic import verify_report

    steps = tuple(int(s) for s in args.steps.split(","))
    start = time.perf_counter()
    report = verify_report(
        step_counts=steps, n_samples=args.samples, seed=args.seed, train_steps=args.train_steps
    )
    report["seconds"] = round(time.perf_counter() - start, 2)
    print(f"closed-form KL(posterior || prior): {report['closed_form_kl_nats']:.3f} nats")
    for row in report["runs"]:
        print(
            f"  {row['steps']:>5} steps: chain KL {row['chain_kl_nats']:.3f} "
            f"+- {row['standard_error_nats']:.3f} nats (ratio {row['ratio_to_closed_form']:.3f}), "
            f"worst 4x4 block off by {100 * row['max_block_relative_error']:.1f}%"
        )
    print(
        f"({report['samples']} posterior samples, schedule of {report['train_steps']} "
        f"timesteps, {report['seconds']} s)"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


TRAIN_PRESETS = {
    # Brain MRI: left-right flips are fine (the brain is nearly symmetric), mild geometry / gain jitter.
    "mri-brain-flair-128": dict(flip_lr=True, rotate_deg=5.0, scale_jitter=0.05, gain_jitter=0.05),
    # Abdominal CT, one patient: no flips (anatomy is not symmetric), small rotations and zoom,
    # +-3% gain and +-0.05 offset (10 HU) in the window.
    "ct-abdomen-128": dict(flip_lr=False, rotate_deg=5.0, scale_jitter=0.05, gain_jitter=0.03, offset_jitter=0.05),
}


def _train(args: argparse.Namespace) -> int:
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


def _evaluate_prior(args: argparse.Namespace) -> int:
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


def _priors(args: argparse.Namespace) -> int:
    from klip_med.priors import available, describe, model_card

    names = available()
    if not names:
        print("no shipped priors installed")
        return 0
    for name in names:
        config = describe(name)
        training = config.training
        print(f"{name}: {config.modality} {config.image_size}x{config.image_size}, "
              f"{training.get('steps_trained', '?')} steps, final loss {training.get('final_loss', '?')}, "
              f"trained on {training.get('manifest', '?')} ({training.get('device', '?')})")
        if args.cards:
            print(model_card(name))
    return 0


# ----------------------------------------------------------------------------- demo / run


def _check_device(device: str) -> str:
    import torch

    expect(device == "cpu" or device.startswith("cuda"), "--device", "cpu or cuda[:N]", repr(device))
    if device.startswith("cuda"):
        expect(torch.cuda.is_available(), "--device", "a CUDA device visible to torch",
               f"{device!r} with torch.cuda.is_available() False (use --device cpu)")
    return device


# KLIPSettings' defaults, written out so `--help` needs no torch import (a test keeps them equal)
RUN_DEFAULTS = {"samples": 4, "steps": 100, "sampler": "fast", "seed": 0, "block_size": 8}


def _settings(args: argparse.Namespace, defaults: dict):
    """KLIPSettings from the shared sampler flags (windows parsed later, once the prior is known)."""
    from klip_med.pipeline import KLIPSettings

    values = {k: v for k, v in defaults.items() if k in ("samples", "steps", "sampler", "seed")}
    values.update({k: getattr(args, k) for k in ("samples", "steps", "sampler", "seed")
                   if getattr(args, k, None) is not None})
    if getattr(args, "block", None) is not None:
        values["block_size"] = args.block
    return KLIPSettings(**values)


def _check_physics(spec: str, image_size: int | None = None) -> None:
    """Parse (and with ``image_size`` build) the operator now, naming ``--physics`` on failure."""
    from klip_med.physics import parse_physics, parse_spec

    try:
        parse_spec(spec) if image_size is None else parse_physics(spec, image_size)
    except KLIPMedError as exc:
        raise KLIPMedError(f"--physics: {exc}") from None


def _print_outputs(summary: dict, out: Path) -> None:
    from klip_med.outputs import one_line

    files = summary["outputs"]
    print(f"outputs in {out}/:")
    for key in ("summary", "report", "recon_nifti", "klip_nifti", "klip_z_nifti", "source_dicom", "recon_series",
                "parametric_map", "seg", "secondary_capture"):
        value = files.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            more = f" (+{len(value) - 1} windows in {Path(value[1]).parent}/)" if len(value) > 1 else ""
            value = f"{value[0]}{more}"
        print(f"  {key:<18} {value}")
    if "seg" in files and files["seg"] is None:
        print("  seg                (not written: no block reached the threshold)")
    print(one_line(summary))


def _demo(args: argparse.Namespace) -> int:
    from klip_med.demo import DEMO_SETTINGS, run_demo
    from klip_med.outputs import parse_threshold

    device = _check_device(args.device)
    settings = _settings(args, DEMO_SETTINGS)  # the demo's defaults
    parse_threshold(args.threshold)
    out = Path(args.out or f"klip-med-demo-{args.case}")
    expect(not out.is_file(), "--out", "a folder (new or existing)", f"a file {str(out)!r}")
    summary = run_demo(out, args.case, device=device, settings=settings, threshold=args.threshold,
                       progress=not args.no_progress, null=args.null)
    _print_outputs(summary, out)
    return 0


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from klip_med import priors
    from klip_med.pipeline import check_windows, default_windows, parse_window
    from klip_med.run import RunOptions, prepare_out, read_input, run_volume

    started = time.perf_counter()
    device = _check_device(args.device)
    input_path = Path(args.input)
    expect(input_path.exists(), "--input", "an existing DICOM folder or file, .nii / .nii.gz or .npz file",
           f"no such path {str(input_path)!r}")
    _check_physics(args.physics)
    out = Path(args.out)
    expect(not out.is_file(), "--out", "a folder (new or existing)", f"a file {str(out)!r}")
    settings = _settings(args, RUN_DEFAULTS)
    options = RunOptions(args.physics, settings, slice_batch=args.slice_batch, threshold=args.threshold,
                         device=device, null=args.null)
    prior = priors.load(args.prior, device=device)
    _check_physics(args.physics, int(prior.image_shape[-1]))
    windows = (tuple(parse_window(w, prior.alphas_cumprod) for w in args.window) if args.window
               else default_windows(prior, settings))
    options = replace(options, settings=replace(settings, windows=windows))
    check_windows(prior, options.settings)
    run_input = read_input(input_path)
    prepare_out(out)
    summary = run_volume(
        run_input, prior, options, out, prior_reference=args.prior, progress=not args.no_progress,
        summary_extra={"timings": {"prepare_s": round(time.perf_counter() - started, 2)}},
        title=f"klip-med run: {input_path.name}",
    )
    _print_outputs(summary, out)
    return 0


def _add_sampler_flags(parser: argparse.ArgumentParser, defaults: dict, outputs: bool = True) -> argparse._ArgumentGroup:
    """Sampler flags shared by demo / run / calibrate; ``outputs`` adds --threshold and --null."""
    group = parser.add_argument_group("sampling and scoring")
    group.add_argument("--samples", type=int, help=f"posterior samples per slice (default {defaults['samples']})")
    group.add_argument("--steps", type=int, help=f"sampling steps (default {defaults['steps']})")
    group.add_argument("--sampler", choices=["fast", "dps"],
                       help="fast: DDS, 1 network call per step; dps: backprop through the network per step "
                            f"(default {defaults['sampler']})")
    group.add_argument("--seed", type=int, help=f"seeds the measurement and the sampler (default {defaults['seed']})")
    if outputs:
        _add_output_flags(group)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return group


def _add_output_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--threshold", default="auto",
                       help="OOD mask (SEG) threshold: 'fpr:A' = blocks whose null z-score only a fraction A of "
                            "in-distribution blocks reach (needs a null model); 'pNN' = NN-th percentile of in-body "
                            "block densities of the volume (uncalibrated); or nats per pixel. Default auto: "
                            "fpr:0.01 with a null model, else p95")
    group.add_argument("--null", default="auto",
                       help="null model of the first window: a JSON file from `klip-med calibrate`, 'auto' (one "
                            "shipped with the prior for exactly these physics and settings, if any) or 'none' "
                            "(default auto)")


def _add_demo_and_run(sub) -> None:
    from klip_med.demo import CT_LESION, CT_PHYSICS, DEMO_SETTINGS, MRI_PHYSICS

    demo = sub.add_parser(
        "demo",
        help="run a bundled real case end to end (about a minute on a laptop CPU)",
        description=(
            "Undersample / sparsely measure a bundled real case, reconstruct it with the shipped prior, "
            "score it with KLIP and write summary.json, recon.nii.gz, klip.nii.gz, report.png and dicom/ "
            "(source image, reconstruction series, Parametric Map, SEG, Secondary Capture). "
            f"mri: a TCGA-LGG FLAIR slice with a tumour, {MRI_PHYSICS}. "
            f"ct: an abdominal CT slice (TotalSegmentator test data) with an inserted {CT_LESION['diameter_mm']:g} mm, "
            f"{CT_LESION['contrast_hu']:g} HU liver lesion, "
            f"{CT_PHYSICS}."
        ),
    )
    demo.add_argument("--case", choices=["mri", "ct"], default="mri", help="which bundled case (default mri)")
    demo.add_argument("--out", help="output folder (default ./klip-med-demo-CASE)")
    _add_sampler_flags(demo, DEMO_SETTINGS)
    demo.set_defaults(run=_demo)

    run = sub.add_parser(
        "run",
        help="reconstruct and score your own volume (DICOM series, NIfTI or .npz)",
        description=(
            "Simulate the acquisition --physics on every slice of the input (resampled to the prior's "
            "128x128 grid, in the prior's intensity units), reconstruct it with the posterior sampler and "
            "score it with KLIP. Slices are saved in OUT/slices/ as they finish: rerunning the same command "
            "skips them. Writes the demo's outputs (DICOM objects only for DICOM input) with the report of "
            "the highest-scoring slice. .npz input: key 'image' (Z,H,W) or (H,W) in HU / MR signal; "
            "optional 'modality', 'pixel_spacing_mm', 'slice_spacing_mm', 'mask', 'mr_scale'."
        ),
        epilog="example: klip-med run --input scan/ --physics ct-sparse:views=60 --prior ct-abdomen-128 --out out/",
    )
    run.add_argument("--input", required=True, help="DICOM folder or file, .nii / .nii.gz, or .npz")
    run.add_argument("--physics", required=True,
                     help="acquisition to simulate: ct-sparse:views=60 | ct-limited:range=120 | "
                          "ct-lowdose:i0=1e4 | mri:accel=4,center=0.08 (add noise=SIGMA)")
    run.add_argument("--prior", required=True, help="shipped prior name (see `klip-med priors`) or a prior folder")
    run.add_argument("--out", required=True, help="output folder (a rerun resumes in it)")
    group = _add_sampler_flags(run, RUN_DEFAULTS)
    group.add_argument("--window", action="append",
                       help="KLIP window, repeatable: full | t:A,B (diffusion time t/T) | sigma:A,B "
                            "(the first one is the headline map in nats; default t:0.1,1 (full with --sampler dps) "
                            "then t:0.1,0.2 ... t:0.9,1, the windows the shipped null models combine)")
    group.add_argument("--block", type=int,
                       help=f"block side in working-grid pixels (default {RUN_DEFAULTS['block_size']})")
    run.add_argument("--slice-batch", type=int, default=1,
                     help="slices per sampler call (B x samples at once; more uses the GPU better; default 1)")
    run.set_defaults(run=_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klip-med",
        description="Diffusion posterior reconstruction of CT / MRI with KLIP out-of-distribution maps.",
        epilog="Start with `klip-med demo`; `klip-med COMMAND --help` for each command. Exit codes: 0 ok, "
               "1 internal error, 2 user error (one line; --debug for the traceback), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"klip-med {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_and_run(sub)
    verify = sub.add_parser(
        "verify",
        help="check the KLIP estimator against a closed-form Gaussian posterior",
        description=(
            "Sample the exact posterior of a 16x16 Gaussian prior under a block-local linear "
            "measurement and compare the accumulated chain KL (total and per 4x4 block) with the "
            "closed-form KL(posterior || prior). The ratio tends to 1 as steps grow."
        ),
    )
    verify.add_argument("--steps", default="250,1000", help="comma-separated step counts")
    verify.add_argument("--samples", type=int, default=128, help="posterior samples")
    verify.add_argument("--seed", type=int, default=1)
    verify.add_argument(
        "--train-steps",
        type=int,
        default=1000,
        help="timesteps of the VP schedule (same SDE, finer discretisation when larger)",
    )
    verify.add_argument("--json", help="also write the report to this JSON file")
    verify.set_defaults(run=_verify)

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
    train.set_defaults(run=_train)

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
    evaluate.set_defaults(run=_evaluate_prior)

    priors = sub.add_parser("priors", help="list the shipped priors", description="List the shipped priors.")
    priors.add_argument("--cards", action="store_true", help="print each model card")
    priors.set_defaults(run=_priors)

    from klip_med.eval.cli import add_eval_parser

    add_eval_parser(sub)
    from klip_med.calibrate_cli import add_calibrate_parser

    add_calibrate_parser(sub)
    from klip_med.bench_cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KLIPMedError as exc:
        if args.debug:
            raise
        print(f"klip-med: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("klip-med: interrupted (rerun the same command to resume a run)", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        print(f"klip-med: error: {exc}", file=sys.stderr)
        return 1
    except Exception:
        if args.debug:
            raise
        traceback.print_exc()
        print("klip-med: internal error (a bug: please report it with the traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
