"""``klip-med calibrate``: fit a KLIP null model on in-distribution data (no OOD data needed).

"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from klip_med.cli.common import (
    RUN_DEFAULTS,
    add_block_size_flag,
    add_engine_flags,
    add_sampler_flags,
    add_windows_flag,
    check_physics,
    engine_from_args,
    settings_from_args,
)
from klip_med.errors import expect


def run_command(args: argparse.Namespace) -> int:
    from klip_med import priors
    from klip_med.calibration.conditions import null_conditions
    from klip_med.eval.nulls import null_from_eval_run
    from klip_med.pipeline.calibrate import calibrate_images, manifest_null_images, prior_null_images
    from klip_med.pipeline.settings import CALIBRATED_WINDOWS, check_windows, parse_window

    started = time.perf_counter()
    engine, device = engine_from_args(args)
    driver = device if engine.engine == "local" else "cpu"  # Ray workers use --device; this process may have no GPU
    sources = [s for s in (args.manifest, args.prior_samples, args.from_eval_run) if s is not None]
    expect(len(sources) == 1, "calibration source",
           "exactly one of --manifest, --prior-samples N or --from-eval-run DIR", f"{len(sources)} given")
    out = Path(args.out)
    expect(out.suffix == ".json" and not out.is_dir(), "--out", "a .json file path", str(out))
    out.parent.mkdir(parents=True, exist_ok=True)  # now, not after the sampling (e.g. a prior's new nulls/ folder)
    check_physics(args.physics)
    prior = priors.load(args.prior, device=driver)
    check_physics(args.physics, int(prior.image_shape[-1]))
    from dataclasses import replace

    settings = settings_from_args(args, RUN_DEFAULTS)
    specs = args.windows or list(CALIBRATED_WINDOWS)
    settings = replace(settings, windows=tuple(parse_window(w, prior.alphas_cumprod) for w in specs))
    check_windows(prior, settings)
    if args.from_eval_run is not None:
        conditions = null_conditions(prior, args.physics, settings)
        null = null_from_eval_run(args.from_eval_run, specs, settings.block_size, conditions, args.conditioning,
                                  spread=args.spread, centring=args.centring)
    else:
        if args.manifest is not None:
            from klip_med.data.manifest import read_manifest

            manifest = read_manifest(args.manifest, args.data_root)
            images, source, groups, prints = manifest_null_images(manifest, args.split, prior, args.max_patients,
                                                                  args.max_slices, settings.seed)
        else:
            images, groups, prints = prior_null_images(prior, args.prior_samples, seed=settings.seed), None, ()
            source = f"{args.prior_samples} unconditional samples of the prior (DDIM eta=1, 100 steps, seed {settings.seed})"
        print(f"calibrating on {len(images)} in-distribution images: {source}")
        null = calibrate_images(prior, args.physics, settings, images, source, conditioning=args.conditioning,
                                spread=args.spread, centring=args.centring, device=device,
                                groups=groups, fingerprints=prints, engine=engine, prior_source=args.prior)
    null.extra["command_seconds"] = round(time.perf_counter() - started, 1)
    null.save(out)
    chosen = null.extra.get("selection", {}).get("heldout_loglik_nats_per_block_window")
    why = f" (held-out ID log-likelihood per block: {chosen})" if chosen else ""
    print(f"wrote {out}: {null.n_images} images, {null.extra['n_blocks']} in-body blocks, "
          f"{null.conditioning} conditioning{why}, centring {null.centring}; z threshold at fpr 0.01: {null.z_threshold(0.01):.2f}, "
          f"at 0.05: {null.z_threshold(0.05):.2f}")
    windows = "--windows " + " ".join(specs)
    print(f"use it: klip-med run ... --physics '{args.physics}' --null {out} (same prior, samples, steps, sampler "
          f"and block size; its windows must be among the run's: {windows if args.windows else 'the default ones'})")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``calibrate`` on the ``klip-med`` subparsers."""
    from klip_med.calibration.centring import CENTRINGS, DEFAULT_CENTRING
    from klip_med.calibration.families import AUTO_FAMILIES, CONDITIONING, SPREADS

    p = subparsers.add_parser(
        "calibrate",
        help="fit a null model (KLIP z-scores, p-values, calibrated SEG threshold) on in-distribution data",
        description=(
            "Measure in-distribution images with --physics, reconstruct them with the same sampler settings a "
            "run will use, and record how much KL each block carries when nothing is out of distribution. "
            "`klip-med run --null FILE` then reports block z-scores / p-values and thresholds the SEG at a "
            "false-positive rate (--threshold fpr:0.01). Sources: lesion-free slices of a manifest split, the "
            "prior's own samples (no data at all), or the lesion-free slices of a `klip-med eval` run."
        ),
    )
    p.add_argument("--prior", required=True, help="shipped prior name or prior folder")
    p.add_argument("--physics", required=True, help="acquisition, as for `klip-med run`")
    p.add_argument("--out", required=True, help="null model JSON file to write")
    add_engine_flags(p, "calibration image")
    src = p.add_argument_group("in-distribution source (exactly one)")
    src.add_argument("--manifest", help="data manifest: its lesion-free slices of --split")
    src.add_argument("--prior-samples", type=int, metavar="N", help="N unconditional samples of the prior")
    src.add_argument("--from-eval-run", metavar="DIR", help="the lesion-free slices cached by `klip-med eval --out DIR`")
    src.add_argument("--data-root", help="with --manifest (default $KLIP_MED_DATA_ROOT)")
    src.add_argument("--split", default="dev", choices=("dev", "test"), help="with --manifest (default dev)")
    src.add_argument("--max-patients", type=int, help="with --manifest: patients (default all)")
    src.add_argument("--max-slices", type=int, default=6, help="with --manifest: images per patient considered "
                     "(half of them lesion-free; default 6)")
    group = add_sampler_flags(p, RUN_DEFAULTS, outputs=False)
    add_windows_flag(group, "windows to calibrate (default: the run's default windows, t:0.1,0.2 ... t:0.9,1); "
                            "the z-scores of several windows are combined")
    add_block_size_flag(group, None, f"block side in pixels (default {RUN_DEFAULTS['block_size']})")
    group.add_argument("--spread", choices=SPREADS, default="predictive",
                       help="per-position spread: predictive (the spread of a new healthy block, honest where a "
                            "position is seldom inside the body; default) or legacy (the first round's, for comparison)")
    group.add_argument("--centring", choices=CENTRINGS, default=DEFAULT_CENTRING,
                       help="slice: remove each window's median z over the slice's in-body blocks before combining "
                            "(the patient's own KL level taken out; a flag then means 'more than the rest of this "
                            f"slice'); none: z against the calibration patients as they are (default {DEFAULT_CENTRING})")
    group.add_argument("--conditioning", choices=CONDITIONING, default="auto",
                       help="what a block is compared with: the same place in the ID images (position), ID blocks "
                            "at the same distance to the body edge (edge), holding as much anatomy (texture: "
                            "posterior-mean block std), of the same brightness (intensity), or all ID blocks "
                            f"(none). Default auto: among {' / '.join(AUTO_FAMILIES)}, the one that predicts "
                            "held-out ID images best (leaving one patient out)")
    p.set_defaults(run=run_command)
    return p
