"""``klip-med batch``: many volumes (a list of inputs or a data manifest) through ``run``, in this
process or on a Ray cluster, resumable per series and per slice."""

from __future__ import annotations

import argparse
from pathlib import Path

from klip_med.cli.common import (
    RUN_DEFAULTS,
    add_block_size_flag,
    add_dicomweb_access_flags,
    add_engine_flags,
    add_sampler_flags,
    add_windows_flag,
    check_out_folder,
    check_physics,
    dicomweb_options,
    engine_from_args,
    settings_from_args,
)
from klip_med.errors import expect


def run_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from klip_med import priors
    from klip_med.calibration.store import resolve_null
    from klip_med.pipeline.batch import INDEX, STATUSES, run_batch
    from klip_med.pipeline.batch_inputs import read_batch_inputs
    from klip_med.pipeline.settings import check_windows, default_windows, parse_window
    from klip_med.pipeline.volume import RunOptions

    engine, device = engine_from_args(args)
    check_physics(args.physics)
    out = check_out_folder(Path(args.out))
    settings = settings_from_args(args, RUN_DEFAULTS)
    overlap = {"allow_calibration_overlap": True} if getattr(args, "allow_calibration_overlap", False) else {}
    options = RunOptions(args.physics, settings, slice_batch=args.slice_batch, threshold=args.threshold,
                         device=device, null=args.null, **overlap)
    prior = priors.load(args.prior)  # on this process's CPU: for its digest and the windows
    check_physics(args.physics, int(prior.image_shape[-1]))
    windows = (tuple(parse_window(w, prior.alphas_cumprod) for w in args.windows) if args.windows
               else default_windows(prior, settings))
    options = replace(options, settings=replace(settings, windows=windows))
    check_windows(prior, options.settings)
    resolve_null(options.null, args.prior, prior, options.physics, options.settings)  # fail now, not after sampling
    inputs = read_batch_inputs(args.inputs, args.data_root, args.split)
    network = {k: True for k in ("channels_last", "bf16") if getattr(args, k)}
    lines = run_batch(inputs, prior, args.prior, options, out, engine, progress=not args.no_progress,
                      network=network, dicomweb=dicomweb_options(args))
    counts = {s: sum(line["status"] == s for line in lines) for s in STATUSES}
    print(f"{out / INDEX}: {len(lines)} inputs, " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    expect(counts["failed"] == 0 and counts["pending"] == 0, "--inputs", "every series to finish",
           f"{counts['failed']} of {len(lines)} failed (their errors are in {out / INDEX}; a rerun retries them)")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``batch`` on the ``klip-med`` subparsers."""
    batch = sub.add_parser(
        "batch",
        help="run many volumes (a list or a data manifest) like `run`, locally or on a Ray cluster",
        description=(
            "Reconstruct and score every input of --inputs exactly as `klip-med run` would, each into "
            "OUT/<name>/ (name: the file or folder name and 8 hex characters of the input as written). "
            "--inputs is a text file with one DICOM folder / file, .nii / .nii.gz, .npz or URL per line "
            "(relative paths: relative to the list; # comments), or a data manifest (.json: one input per "
            "item). OUT/index.jsonl holds one line per input (status, error, image score, p-values, seconds, "
            "device, worker) and a summary line. Rerunning the same command skips finished series and resumes "
            "the others slice by slice; a series that fails records its error and the others go on. "
            "--engine ray runs --workers Ray actors, each loading the prior once (a local Ray cluster, or "
            "--ray-address auto to join one started with `ray start --head`); it needs "
            "pip install 'klip-med[ray]'. Exit code 2 when any series failed."
        ),
        epilog="example: klip-med batch --inputs cohort.txt --physics ct-sparse:views=60 --prior ct-abdomen-128 "
               "--out out/ --engine ray --workers 4 --gpus-per-worker 1 --device cuda",
    )
    batch.add_argument("--inputs", required=True, help="a text file with one input per line, or a data manifest (.json)")
    batch.add_argument("--physics", required=True,
                       help="acquisition to simulate: ct-sparse:views=60 | ct-limited:range=120 | "
                            "ct-lowdose:i0=1e4 | mri:accel=4,center=0.08 (add noise=SIGMA)")
    batch.add_argument("--prior", required=True, help="shipped prior name (see `klip-med priors`) or a prior folder "
                                                      "(the same path on every Ray node)")
    batch.add_argument("--out", required=True, help="output folder (a rerun resumes in it; shared by every Ray node)")
    engine = add_engine_flags(batch, "series")
    add_dicomweb_access_flags(batch.add_argument_group("DICOMweb inputs (series URLs in the list)"))
    engine.add_argument("--data-root", help="data manifests: the folder its files are relative to "
                                            "(default $KLIP_MED_DATA_ROOT)")
    engine.add_argument("--split", choices=["train", "dev", "test"], help="data manifests: one split (default all)")
    group = add_sampler_flags(batch, RUN_DEFAULTS)
    add_windows_flag(group, "KLIP windows, as for `klip-med run` (default: run's)")
    add_block_size_flag(group, None, f"block side in working-grid pixels (default {RUN_DEFAULTS['block_size']})")
    network = batch.add_argument_group("network execution (opt-in: outputs then differ from run's by the "
                                       "tolerances measured in docs/batch.md)")
    network.add_argument("--channels-last", action="store_true",
                         help="channels-last layout (oneDNN's native CPU layout): faster on CPU, float32 rounding")
    network.add_argument("--bf16", action="store_true",
                         help="bfloat16 autocast of the network, for CPUs with AMX / AVX512-BF16 and GPUs (may be "
                              "slower where bf16 is emulated); moves block densities by up to ~3%%")
    batch.add_argument("--slice-batch", type=int, default=1,
                       help="slices per sampler call (B x samples at once; more uses a GPU better; default 1)")
    batch.set_defaults(run=run_command)
    return batch
