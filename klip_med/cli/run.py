"""``klip-med run``: reconstruct and score your own volume (DICOM series from a folder or a PACS over
DICOMweb, NIfTI or .npz), and optionally push the DICOM outputs back to a PACS (STOW-RS)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from klip_med.cli.common import (
    RUN_DEFAULTS,
    add_block_size_flag,
    add_dicomweb_access_flags,
    add_sampler_flags,
    add_windows_flag,
    check_device,
    check_out_folder,
    check_physics,
    dicomweb_options,
    print_outputs,
    settings_from_args,
)
from klip_med.errors import KLIPMedError, expect


def push_outputs(args: argparse.Namespace, summary: dict, out: Path, options) -> None:
    """STOW-RS the run's DICOM objects to --push; record the outcome in summary.json; raise on failure."""
    from klip_med.io.dicomweb import push_output_set
    from klip_med.io.json_files import write_json

    report = push_output_set(args.push, out, summary["outputs"], options)
    summary = {**summary, "push": report.as_dict()}
    write_json(out / "summary.json", summary)
    if not report.ok:
        raise KLIPMedError(f"{report.error_line()} (the local outputs in {out}/ are complete)")
    print(f"pushed {len(report.sent)} DICOM files to {report.root} (STOW-RS)")


def run_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from klip_med import priors
    from klip_med.io.dicomweb import is_dicomweb_url, parse_root_url, parse_series_url, warn_plain_http
    from klip_med.io.inputs import read_input
    from klip_med.pipeline.settings import check_windows, default_windows, parse_window
    from klip_med.pipeline.slice_store import prepare_out
    from klip_med.pipeline.volume import RunOptions, run_volume

    started = time.perf_counter()
    device = check_device(args.device)
    options = dicomweb_options(args)
    if is_dicomweb_url(args.input):
        warn_plain_http(str(parse_series_url(args.input)), options, "--input")
        input_name = args.input.rstrip("/").rsplit("/", 1)[-1]
    else:
        input_path = Path(args.input)
        expect(input_path.exists(), "--input", "an existing DICOM folder or file, .nii / .nii.gz or .npz file, "
               "or a DICOMweb series URL", f"no such path {str(input_path)!r}")
        input_name = input_path.name
    if args.push:
        warn_plain_http(parse_root_url(args.push), options, "--push")
    check_physics(args.physics)
    out = check_out_folder(Path(args.out))
    settings = settings_from_args(args, RUN_DEFAULTS)
    run_options = RunOptions(args.physics, settings, slice_batch=args.slice_batch, threshold=args.threshold,
                             device=device, null=args.null,
                             allow_calibration_overlap=args.allow_calibration_overlap)
    prior = priors.load(args.prior, device=device)
    check_physics(args.physics, int(prior.image_shape[-1]))
    windows = (tuple(parse_window(w, prior.alphas_cumprod) for w in args.windows) if args.windows
               else default_windows(prior, settings))
    run_options = replace(run_options, settings=replace(settings, windows=windows))
    check_windows(prior, run_options.settings)
    run_input = read_input(args.input, dicomweb=options)
    if args.push:
        expect(run_input.volume.is_dicom, "--push", "a DICOM or DICOMweb --input (only those give DICOM outputs)",
               f"{run_input.format} input")
    prepare_out(out)
    summary = run_volume(
        run_input, prior, run_options, out, prior_reference=args.prior, progress=not args.no_progress,
        summary_extra={"timings": {"prepare_s": round(time.perf_counter() - started, 2)}},
        title=f"klip-med run: {input_name}",
    )
    print_outputs(summary, out)
    if args.push:
        push_outputs(args, summary, out, options)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``run`` on the ``klip-med`` subparsers."""
    run = sub.add_parser(
        "run",
        help="reconstruct and score your own volume (DICOM series / DICOMweb URL, NIfTI or .npz)",
        description=(
            "Simulate the acquisition --physics on every slice of the input (resampled to the prior's "
            "128x128 grid, in the prior's intensity units), reconstruct it with the posterior sampler and "
            "score it with KLIP. Slices are saved in OUT/slices/ as they finish: rerunning the same command "
            "skips them. Writes the demo's outputs (DICOM objects only for DICOM input) with the report of "
            "the highest-scoring slice. DICOMweb: --input http(s)://HOST/ROOT/studies/<StudyUID>/series/<SeriesUID> "
            "(QIDO-RS + WADO-RS), --push http(s)://HOST/ROOT (STOW-RS of every DICOM output, after the local "
            "write). .npz input: key 'image' (Z,H,W) or (H,W) in HU / MR signal; "
            "optional 'modality', 'pixel_spacing_mm', 'slice_spacing_mm', 'mask', 'mr_scale'."
        ),
        epilog="example: klip-med run --input scan/ --physics ct-sparse:views=60 --prior ct-abdomen-128 --out out/ ; from a PACS: KLIP_TOKEN=... klip-med run --input https://pacs/dicom-web/studies/1.2/series/1.3 "
               "--auth bearer:env:KLIP_TOKEN --push https://pacs/dicom-web --physics ... --prior ... --out out/",
    )
    run.add_argument("--input", required=True,
                     help="DICOM folder or file, .nii / .nii.gz, .npz, or a DICOMweb series URL "
                          "http(s)://HOST/ROOT/studies/<StudyUID>/series/<SeriesUID>")
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
    web = run.add_argument_group("DICOMweb (a PACS)")
    web.add_argument("--push", metavar="URL",
                     help="after the outputs are written, store every DICOM object (derived series, Parametric "
                          "Map, SEG, Secondary Capture) on this DICOMweb root with STOW-RS, e.g. "
                          "https://pacs/dicom-web; a failed push leaves the local outputs and says what was not sent")
    add_dicomweb_access_flags(web)
    run.set_defaults(run=run_command)
    return run
