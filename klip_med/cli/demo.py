"""``klip-med demo``: a bundled real case, measured, reconstructed with a shipped prior, scored, written."""

from __future__ import annotations

import argparse
from pathlib import Path

from klip_med.cli.common import (
    add_block_size_flag,
    add_sampler_flags,
    add_windows_flag,
    check_device,
    check_out_folder,
    print_outputs,
    settings_from_args,
)


def run_command(args: argparse.Namespace) -> int:
    from klip_med.calibration.thresholds import parse_threshold
    from klip_med.pipeline.demo import DEMO_SETTINGS, run_demo

    device = check_device(args.device)
    settings = settings_from_args(args, DEMO_SETTINGS)  # the demo's defaults
    parse_threshold(args.threshold)
    out = check_out_folder(Path(args.out or f"klip-med-demo-{args.case}"))
    summary = run_demo(out, args.case, device=device, settings=settings, threshold=args.threshold,
                       progress=not args.no_progress, null=args.null, windows=args.windows)
    print_outputs(summary, out)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``klip-med`` subparsers."""
    from klip_med.pipeline.demo import CT_LESION, CT_PHYSICS, DEMO_SETTINGS, MRI_PHYSICS

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
    group = add_sampler_flags(demo, DEMO_SETTINGS)
    add_windows_flag(group, "KLIP windows (default: those of `klip-med run`)")
    add_block_size_flag(group, None, "block side in working-grid pixels (default 8)")
    demo.set_defaults(run=run_command)
    return demo
