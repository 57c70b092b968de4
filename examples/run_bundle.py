"""Run the bundle: export a shipped prior as a MONAI bundle, verify it offline, run it with MONAI's runner.

    python examples/run_bundle.py --out bundle_out                 # ~30 s on a 2-core CPU (1 sample, 10 steps)
    python examples/run_bundle.py --prior ct-abdomen-128 --samples 4 --steps 50

The same three steps from a shell (``python -m monai.bundle`` needs the ``fire`` package)::

    klip-med export-bundle --prior mri-brain-flair-128 --out B
    python -m monai.bundle verify_metadata --meta_file B/configs/metadata.json \\
        --filepath B/configs/meta_schema_20240725.json --hash_val 76e1add273836515d0bbb3bc71962474
    python -m monai.bundle run --config_file B/configs/inference.json --bundle_root B --samples 1 --steps 10

Here they are called through MONAI's Python API (``monai.bundle.verify_metadata`` / ``run``, what the
command line calls). ``verify_metadata`` finds MONAI's schema already at ``--filepath`` (shipped in
``configs/``) and so never downloads; ``run`` parses ``configs/inference.json`` and runs
``LoadImaged -> EnsureChannelFirstd -> Orientationd -> KLIPReconstructd -> SaveImaged`` on the
bundle's sample NIfTI (the demo case of the prior), writing the posterior mean, std and KLIP map.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import run, verify_metadata

from klip_med.priors.bundle import SCHEMA_MD5, SCHEMA_NAME


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bundle_out"), help="output folder")
    parser.add_argument("--prior", default="mri-brain-flair-128", help="a shipped prior")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--null", default="none", help="the config's null model: 'auto' adds the calibrated "
                        "klip_z map when a shipped null model matches (4 samples, 50 steps); default 'none'")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.out / args.prior
    export = [sys.executable, "-m", "klip_med", "export-bundle", "--prior", args.prior, "--out", str(bundle)]
    if bundle.exists():
        export.append("--overwrite")
    subprocess.run(export, check=True)

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"),
                    filepath=str(bundle / "configs" / SCHEMA_NAME), hash_val=SCHEMA_MD5)
    print(f"verified        {bundle / 'configs' / 'metadata.json'} against MONAI's {SCHEMA_NAME} (offline)")

    results = bundle / "eval"
    run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), output_dir=str(results),
        samples=args.samples, steps=args.steps, device=args.device, null=args.null)
    for path in sorted(results.glob("*.nii.gz")):
        image = nib.load(path)
        values = image.get_fdata(dtype=np.float32)
        print(f"wrote           {path.name:<32} shape {image.shape}, range [{values.min():.4g}, {values.max():.4g}]")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
