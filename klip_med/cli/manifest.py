"""``klip-med manifest``: turn your own DICOM folders / NIfTI files into a data manifest."""

from __future__ import annotations

import argparse

DEFAULT_LICENCE = "user data: not for redistribution"
"""The same as :data:`klip_med.data.build.DEFAULT_LICENCE` (kept here: building the parser imports nothing heavy)."""


def run_command(args: argparse.Namespace) -> int:
    from klip_med.data.build import summary_table
    from klip_med.pipeline.build_manifest import build_manifest

    result = build_manifest(
        args.inputs, args.data_root, args.name, args.out, modality=args.modality, size=args.size,
        prior=args.prior, fractions=args.split_fractions, seed=args.seed, licence=args.licence,
        patient_from=args.patient_from, overwrite=args.overwrite,
        log=None if args.quiet else (lambda line: print(line, flush=True)),
    )
    for note in result.notes:
        print(f"note: {note}")
    manifest = result.manifest
    print(f"{manifest.name}: {manifest.modality}, {len(manifest.items)} series, array '{manifest.array_key}', "
          f"files under {manifest.root / manifest.name}")
    print(summary_table(result.counts))
    print(f"wrote {manifest.source} (checked with read_manifest: files and checksums)")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``manifest`` on the ``klip-med`` subparsers."""
    manifest = sub.add_parser(
        "manifest",
        help="build a data manifest from your own DICOM folders / NIfTI files",
        description=(
            "Find every image series under the inputs (DICOM folders, searched recursively and grouped by "
            "SeriesInstanceUID; NIfTI files), read each in physical units (HU for CT), resample it in plane "
            "to the working grid, write one .npz per series under DATA_ROOT/NAME/ and a manifest JSON with "
            "SHA-256 checksums and train / dev / test splits by patient (DICOM PatientID; NIfTI: file stem). "
            "The same inputs and seed give the same files and manifest. Inputs are only read. Then: "
            "`klip-med train --manifest OUT --data-root DATA_ROOT ...` (see docs/own-data.md)."
        ),
    )
    manifest.add_argument("inputs", nargs="+", metavar="INPUT",
                          help="DICOM folder (several series, nested folders allowed), DICOM file, or .nii / .nii.gz")
    manifest.add_argument("--data-root", required=True,
                          help="folder the manifest's files are relative to; the .npz files go to DATA_ROOT/NAME/")
    manifest.add_argument("--name", required=True, help="manifest name and sub-folder of DATA_ROOT (e.g. my-ct)")
    manifest.add_argument("--out", required=True, help="manifest JSON to write (e.g. my_ct.json)")
    manifest.add_argument("--modality", choices=("CT", "MR"),
                          help="default: the DICOM Modality; required for NIfTI input")
    grid = manifest.add_mutually_exclusive_group()
    grid.add_argument("--size", type=int, help="in-plane working grid in pixels, SIZE x SIZE (default 128)")
    grid.add_argument("--prior", help="take the grid size from this prior (shipped name or folder; modality checked)")
    manifest.add_argument("--split-fractions", default="0.7,0.15,0.15",
                          help="train,dev,test fractions of PATIENTS (default 0.7,0.15,0.15; 1,0,0 puts all in train)")
    manifest.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    manifest.add_argument("--patient-from", choices=("auto", "input", "parent", "study"), default="auto",
                          help="patient id: auto = DICOM PatientID, NIfTI file stem (default); for anonymised data: "
                               "input = the INPUT folder / file name (one INPUT per patient), parent = the folder "
                               "holding the files, study = DICOM StudyInstanceUID")
    manifest.add_argument("--licence", default=DEFAULT_LICENCE, help=f"licence text (default {DEFAULT_LICENCE!r})")
    manifest.add_argument("--overwrite", action="store_true",
                          help="replace an existing --out (and .npz files whose contents differ)")
    manifest.add_argument("--quiet", action="store_true", help="no line per series")
    manifest.set_defaults(run=run_command)
    return manifest
