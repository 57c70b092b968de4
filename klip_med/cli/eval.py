"""``klip-med eval``: benchmark KLIP against baselines on a manifest (AUROCs with intervals)."""

from __future__ import annotations

import argparse
import shlex
import sys

from klip_med.cli.common import (
    RUN_DEFAULTS,
    Deprecated,
    add_block_size_flag,
    add_engine_flags,
    add_sampler_flags,
    add_windows_flag,
    engine_from_args,
    settings_from_args,
)
from klip_med.eval.names import BASELINES, DEFAULT_WINDOWS, READOUTS, SHIFTS

EVAL_DEFAULTS = RUN_DEFAULTS
"""``klip-med eval`` evaluates the map ``klip-med run`` makes: the same sampler defaults, the run's
windows (:data:`klip_med.eval.names.DEFAULT_WINDOWS`) and the shipped null model (``--null auto``)."""


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, found {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, found {text!r}")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, found {text!r}") from None


def run_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from klip_med.eval.baselines import BaselineSettings
    from klip_med.eval.runner import run_benchmark

    engine, device = engine_from_args(args)
    block_sizes = args.block_size
    settings = replace(settings_from_args(args, EVAL_DEFAULTS), block_size=block_sizes[0], top_k=args.top_k)
    baselines = BaselineSettings(anoddpm_t=args.anoddpm_t, anoddpm_steps=args.anoddpm_steps,
                                 eigen_levels=args.eigen_levels, eigen_rank=args.eigen_rank,
                                 eigen_iterations=args.eigen_iterations, cfs_train_slices=args.cfs_train_slices,
                                 diffguard_t=args.diffguard_t, diffguard_steps=args.diffguard_steps,
                                 diffguard_scale=args.diffguard_scale, monai_timesteps=args.monai_timesteps,
                                 skip=tuple(args.skip))
    results = run_benchmark(
        args.manifest, args.data_root, args.prior, args.physics, args.split, settings, args.max_patients,
        args.max_slices, args.out, windows=args.windows, baselines=baselines, lesions=args.lesions,
        device=device, block_sizes=block_sizes, n_boot=args.bootstrap, metrics_only=args.metrics_only,
        pixel_spacing_mm=args.pixel_spacing_mm, command="klip-med " + shlex.join(sys.argv[1:]),
        null=args.null, null_windows=args.null_windows, null_conditioning=args.null_conditioning,
        null_centring=args.null_centring,
        ct_lesions=args.ct_lesions, allow_calibration_overlap=args.allow_calibration_overlap, shift=args.shift,
        readouts=tuple(args.readouts), engine=engine,
    )
    from klip_med.eval.results import markdown_table

    print(markdown_table(results))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``klip-med`` subparsers."""
    from klip_med.calibration.centring import CENTRINGS, DEFAULT_CENTRING
    from klip_med.calibration.families import CONDITIONING

    p = subparsers.add_parser(
        "eval",
        help="benchmark KLIP against baselines on a manifest (AUROCs with intervals)",
        description=(
            "For held-out slices of a manifest (ID: lesion-free, OOD: with a lesion, matched per patient), "
            "simulate measurements, sample the posterior once per slice, and score KLIP (several windows, "
            "ours and the paper's normalisation) and baselines (posterior std, residual, AnoDDPM, EigenScore, "
            "UNet-feature density fitted on ID training slices, DLSR, DiffGuard, MONAI likelihood, brightness, its "
            "deviation, centrality) on the "
            "same blocks: dataset-level and localisation AUROC / AUPRC with per-patient bootstrap intervals, NFE and seconds per image. Resumable: "
            "slices are cached in OUT/slices."
        ),
    )
    p.add_argument("--manifest", required=True, help="data manifest JSON (e.g. data_manifests/lgg_flair_128.json)")
    p.add_argument("--data-root", help="folder the manifest's files are relative to (default $KLIP_MED_DATA_ROOT)")
    p.add_argument("--prior", required=True, help="shipped prior name or prior folder")
    p.add_argument("--physics", required=True, help="operator, e.g. mri:accel=4,center=0.08,noise=0.01")
    p.add_argument("--split", choices=("dev", "test"), default="dev",
                   help="dev to choose settings; test for final numbers only (default dev)")
    group = add_sampler_flags(p, EVAL_DEFAULTS, outputs=False, progress=False)
    add_windows_flag(group, f"KLIP windows, all filled in one pass (default: those of `klip-med run`, "
                            f"{' '.join(DEFAULT_WINDOWS)}; full with --sampler dps instead of t:0.1,1)")
    add_block_size_flag(group, [EVAL_DEFAULTS["block_size"]], "block side in pixels, or several comma-separated "
                        "(e.g. 4,8,16; the first -> results.*; default 8)", type_=_ints)
    group.add_argument("--block-sizes", dest="block_size", type=_ints, action=Deprecated, new="--block-size",
                       help=argparse.SUPPRESS)
    p.add_argument("--top-k", type=int, default=5, help="image score = mean of the top-k blocks (default 5)")
    p.add_argument("--max-patients", type=int, help="patients, evenly spaced through the split (default all)")
    p.add_argument("--max-slices", type=int, default=10, help="images per patient, OOD + ID (default 10)")
    p.add_argument("--lesions", choices=("auto", "real", "inserted"), default="auto",
                   help="real masks, or matched pairs with inserted lesions (auto: real if the manifest has masks)")
    p.add_argument("--ct-lesions", choices=("soft-tissue", "body"), default="soft-tissue",
                   help="inserted CT lesion design: soft-tissue (hypodense -80..-40 HU, wholly in liver/kidney/"
                        "spleen/muscle; default) or body (the first design: +-10..60 HU anywhere in the body)")
    p.add_argument("--shift", choices=SHIFTS,
                   help="with --lesions inserted: one shift kind inserted into lesion-free held-out slices as matched "
                        "twins: bright (FLAIR hyperintense / CT +40..80 HU), hypo (FLAIR CSF-like cavity / CT -80..-40 "
                        "HU), texture (same mean, other texture), star (the KLIP paper's star), metal (CT only); "
                        "recorded in results.json; one kind per --out")
    p.add_argument("--pixel-spacing-mm", type=float, help="for inserted lesions when files carry no spacing")
    p.add_argument("--readouts", nargs="*", default=[], choices=READOUTS, metavar="READOUT",
                   help="further KLIP read-outs of the same sampling pass: denoised (the KL split over pixels by "
                        "the prior's denoiser, klip_dn[<window>] rows, one extra forward per step), tstat (a "
                        "t-statistic over the posterior samples, klip_t[<window>] rows, free)")
    p.add_argument("--skip", nargs="*", default=[], choices=BASELINES, metavar="BASELINE",
                   help=f"baselines not to compute ({', '.join(BASELINES)})")
    p.add_argument("--anoddpm-t", type=float, default=0.25, help="AnoDDPM re-noising time t/(T-1) (default 0.25)")
    p.add_argument("--anoddpm-steps", type=int, default=5, help="AnoDDPM DDIM steps back (default 5)")
    p.add_argument("--eigen-levels", type=_floats, default=(0.1, 0.25, 0.5),
                   help="EigenScore noise levels as t/(T-1) (default 0.1,0.25,0.5)")
    p.add_argument("--eigen-rank", type=int, default=4, help="EigenScore eigenpairs per level (default 4)")
    p.add_argument("--eigen-iterations", type=int, default=3, help="EigenScore subspace iterations (default 3)")
    p.add_argument("--cfs-train-slices", type=int, default=64,
                   help="ID training slices the cfs feature density is fitted on (default 64)")
    p.add_argument("--diffguard-t", type=float, default=0.4,
                   help="DiffGuard: re-noising time t/(T-1) of the guided re-generation (default 0.4)")
    p.add_argument("--diffguard-steps", type=int, default=10, help="DiffGuard: guided DDIM steps back (default 10)")
    p.add_argument("--diffguard-scale", type=float, default=2.0,
                   help="DiffGuard: classifier-guidance scale, 0 = unguided (default 2)")
    p.add_argument("--monai-timesteps", type=int, default=25,
                   help="MONAI likelihood: timesteps evenly spaced over [1, T-1] (default 25)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--metrics-only", action="store_true", help="no sampling: summarise the cached slices")
    add_engine_flags(p, "slice")
    p.add_argument("--null", default="auto",
                   help="the null-calibrated row klip_z[...] (the default map of `klip-med run`): 'auto' (the model "
                        "shipped with the prior for these settings, as run; default), a null model file from "
                        "`klip-med calibrate` (e.g. fitted on the dev split, for test numbers), 'lopo' (each patient "
                        "scored against the lesion-free slices of the other patients of this run) or 'none'")
    p.add_argument("--allow-calibration-overlap", action="store_true",
                   help="score slices that the null model was fitted on (refused otherwise) and report their rates "
                        "apart from the fresh ones")
    p.add_argument("--null-windows", nargs="+", help="windows the klip_z row combines (default: the model's; "
                   "for lopo t:0.1,0.2 ... t:0.9,1 when all are among --windows, else the first)")
    p.add_argument("--null-conditioning", choices=CONDITIONING, default="auto",
                   help="with --null lopo (default auto: chosen in each fold from the other patients' lesion-free "
                        "slices by held-out likelihood)")
    p.add_argument("--null-centring", choices=CENTRINGS, default=DEFAULT_CENTRING,
                   help=f"with --null lopo: slice (each slice's own level removed per window) or none (default "
                        f"{DEFAULT_CENTRING}; a model file carries its own)")
    p.add_argument("--out", required=True, help="results folder (resumable)")
    p.set_defaults(run=run_command)
    return p
