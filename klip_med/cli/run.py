"""``klip-med run``: reconstruct and score your own volume (DICOM series, NIfTI or .npz)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from klip_med.cli.common import (
    RUN_DEFAULTS,
    add_block_size_flag,
    add_sampler_flags,
    add_windows_flag,
    check_device,
    check_out_folder,
    check_physics,
    print_outputs,
    settings_from_args,
)
from klip_med.errors import expect


def run_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from klip_med import priors
    from klip_med.io.inputs import read_input
    from klip_med.pipeline.settings import check_windows, default_windows, parse_window
    from klip_med.pipeline.slice_store import prepare_out
    from klip_med.pipeline.volume import RunOptions, run_volume

    started = time.perf_counter()
    device = check_device(args.device)
    input_path = Path(args.input)
    expect(input_path.exists(), "--input", "an existing DICOM folder or file, .nii / .nii.gz or .npz file",
           f"no such path {str(input_path)!r}")
    check_physics(args.physics)
    out = check_out_folder(Path(args.out))
    settings = settings_from_args(args, RUN_DEFAULTS)
    options = RunOptions(args.physics, settings, slice_batch=args.slice_batch, threshold=args.threshold,
                         device=device, null=args.null)
    prior = priors.load(args.prior, device=device)
    check_physics(args.physics, int(prior.image_shape[-1]))
    windows = (tuple(parse_window(w, prior.alphas_cumprod) for w in args.windows) if args.windows
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
    print_outputs(summary, out)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``run`` on the ``klip-med`` subparsers."""
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
    group = add_sampler_flags(run, RUN_DEFAULTS)
    add_windows_flag(group, "KLIP windows: full | t:A,B (diffusion time t/(T-1)) | sigma:A,B (the first one is the "
                            "headline map in nats; default t:0.1,1 (full with --sampler dps) then t:0.1,0.2 ... "
                            "t:0.9,1, the windows the shipped null models combine)")
    add_block_size_flag(group, None, f"block side in working-grid pixels (default {RUN_DEFAULTS['block_size']})")
    run.add_argument("--slice-batch", type=int, default=1,
                     help="slices per sampler call (B x samples at once; more uses the GPU better; default 1)")
    run.set_defaults(run=run_command)
    return run
