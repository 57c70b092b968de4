"""``klip-med export-bundle``: the shipped priors (or a prior folder) as MONAI bundles."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def demo_sample(name: str, folder: Path) -> tuple[Path, str] | None:
    """The demo case of a shipped prior written as NIfTI in ``folder``, with its source and licence."""
    import json

    import numpy as np

    from klip_med.io import Volume, read_dicom_series, write_nifti
    from klip_med.pipeline.demo import PRIORS, case_file

    case = {prior: kind for kind, prior in PRIORS.items()}.get(name)
    if case == "mri":
        info = json.loads(case_file("lgg_flair_demo.json").read_text(encoding="utf-8"))
        with np.load(case_file("lgg_flair_demo.npz")) as data:
            flair = data["flair"].astype(np.float32)
        spacing = float(info["pixel_spacing_mm_nominal"])
        volume = Volume(flair[None], np.diag([spacing, spacing, 5.0, 1.0]), None, "bundled case lgg_flair_demo")
        note = f"{info['patient']} slice {info['slice_number']}, nominal {spacing} mm pixels; {info['source']}; {info['licence']}"
        return write_nifti(volume, folder / "flair_demo.nii.gz"), note
    if case == "ct":
        info = json.loads(case_file("ct_abdomen_demo", "case.json").read_text(encoding="utf-8"))
        volume = read_dicom_series(case_file("ct_abdomen_demo", "ct_slice.dcm"), derive_missing_uids=True)
        note = f"abdominal CT slice (HU) from {info['source']['repository']}; {info['licence']}"
        return write_nifti(volume, folder / "ct_abdomen_demo.nii.gz"), note
    return None


def run_command(args: argparse.Namespace) -> int:
    from klip_med.errors import expect
    from klip_med.pipeline.demo import CT_PHYSICS, MRI_PHYSICS
    from klip_med.priors import available, describe
    from klip_med.priors.bundle import SCHEMA_MD5, SCHEMA_NAME, export_bundle
    from klip_med.priors.config import PriorConfig
    from klip_med.priors.registry import resolve_prior_path

    shipped = available()
    names = list(shipped) if args.prior == "all" else [args.prior]
    expect(bool(names), "--prior", "a shipped prior (none installed) or a prior folder", args.prior)
    expect(args.sample is None or len(names) == 1, "--sample", "one prior (not 'all')", args.sample)
    for name in names:
        if name in shipped:
            config = describe(name)
        else:
            folder = resolve_prior_path(name)
            config = PriorConfig.read((folder if folder.is_dir() else folder.parent) / "config.json")
        physics = args.physics or (CT_PHYSICS if config.modality == "CT" else MRI_PHYSICS)
        target = args.out / config.name if args.prior == "all" else args.out
        with tempfile.TemporaryDirectory() as tmp:
            sample, note = (Path(args.sample), "") if args.sample else (demo_sample(name, Path(tmp)) or (None, ""))
            out = export_bundle(name, target, physics, sample=sample, sample_note=note, samples=args.samples,
                                steps=args.steps, sampler=args.sampler, seed=args.seed, overwrite=args.overwrite)
        print(f"{config.name}: {out} (physics {physics}; sample {sample.name if sample else 'none'})")
        print(f"  python -m monai.bundle verify_metadata --meta_file {out}/configs/metadata.json "
              f"--filepath {out}/configs/{SCHEMA_NAME} --hash_val {SCHEMA_MD5}")
        print(f"  python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``export-bundle`` on the ``klip-med`` subparsers."""
    p = sub.add_parser(
        "export-bundle", help="export the shipped priors (or a prior folder) as MONAI bundles",
        description="Write a prior as a MONAI bundle: configs/metadata.json (validated by `python -m monai.bundle "
                    "verify_metadata`, offline with the schema copy in configs/), configs/inference.json "
                    "(LoadImaged -> KLIPReconstructd -> SaveImaged, run by `python -m monai.bundle run`), the "
                    "safetensors weights, docs/README.md with the model card and licences, and a sample NIfTI.")
    p.add_argument("--prior", default="all", help="a shipped prior name, a prior folder, or 'all' (default: every "
                   "shipped prior, each into OUT/<name>)")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder (or, with 'all', their parent)")
    p.add_argument("--physics", help="default measurement of the inference config (default: the demo's for the "
                   "prior's modality)")
    p.add_argument("--sample", help="a NIfTI to ship in sample_data/ (default: the demo case of a shipped prior)")
    p.add_argument("--samples", type=int, default=4, help="posterior samples in the config (default 4)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps in the config (default 50)")
    p.add_argument("--sampler", choices=["fast", "dps"], default="fast", help="sampler in the config (default fast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing bundle folders")
    p.set_defaults(run=run_command)
    return p
