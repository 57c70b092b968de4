"""A MONAI pipeline: NIfTI in, reconstruction + KLIP map NIfTIs out, lying on the source geometry.

    python examples/monai_pipeline.py --out monai_out            # the bundled FLAIR slice, ~1 min on CPU
    python examples/monai_pipeline.py --input my_flair.nii.gz    # your own MR NIfTI (axial slices)

Without ``--input`` the script writes the bundled TCGA-LGG FLAIR slice with a tumour
(``klip_med/cases/lgg_flair_demo.npz``, CC BY-NC-SA 4.0, see its .json) as ``flair_demo.nii.gz``
with a nominal 1.875 mm grid, plus its tumour mask. Then a plain MONAI ``Compose`` loads it,
reorients it to RAS, simulates 4x undersampled k-space with ``KLIPReconstructd`` and the shipped
``mri-brain-flair-128`` prior, and saves the posterior mean, the KLIP map (nats per pixel), the
posterior std and, when the prior ships a null model for these settings (the defaults here: 4
samples, 50 steps), the calibrated KLIP z map (``klip-med run``'s default map) with
``SaveImaged``: open them in any NIfTI viewer over the source image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, SaveImaged

from klip_med.io import Volume, write_nifti
from klip_med.monai import KLIPReconstructd

CASE = Path(__file__).resolve().parents[1] / "klip_med" / "cases" / "lgg_flair_demo.npz"
SPACING_MM = (1.875, 1.875, 5.0)  # nominal: the published set has no geometry (see the case's .json)


def write_case(folder: Path) -> tuple[Path, Path, float]:
    """The bundled slice as NIfTI (MR signal, uint8 as published) and its tumour mask.

    Returns:
        the image path, the mask path, and the prior's MR scale of the patient's whole volume.
    """
    case = np.load(CASE)
    # klip_med.io volumes are (Z, H, W) in radiological display with an LPS affine: rows run to
    # posterior, columns to the patient's left; write_nifti converts to NIfTI's RAS.
    affine_lps = np.diag([*SPACING_MM, 1.0])
    image = Volume(case["flair"][None].astype(np.float32), affine_lps, None, str(CASE))
    image_path = write_nifti(image, folder / "flair_demo.nii.gz")
    mask_path = write_nifti(case["mask"][None].astype(np.uint8), folder / "flair_demo_tumour.nii.gz",
                            reference=image, dtype=np.uint8)
    return image_path, mask_path, float(case["volume_mr_scale"])


OUTPUTS = ("recon", "klip", "std", "klip_z")
"""Outputs of KLIPReconstructd that are saved (``klip_z`` only exists when a null model applies)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("monai_pipeline_out"), help="output folder")
    parser.add_argument("--input", type=Path, default=None, help="your own MR NIfTI (default: bundled case)")
    parser.add_argument("--physics", default="mri:accel=4,center=0.08,noise=0.01")
    parser.add_argument("--samples", type=int, default=4, help="posterior samples per slice (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    mask_path, mr_scale = None, None
    if args.input is None:
        source, mask_path, mr_scale = write_case(args.out)
    else:
        source = args.input

    pipeline = Compose([
        LoadImaged(keys="image", reader="NibabelReader"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=None),
        # slices are flipped into the prior's orientation and back inside the transform
        KLIPReconstructd(keys="image", prior="mri-brain-flair-128", physics=args.physics,
                         samples=args.samples, steps=args.steps, seed=args.seed, device=args.device,
                         mr_scale=mr_scale),
        *(SaveImaged(keys=f"image_{name}", output_dir=args.out, output_postfix=name, separate_folder=False,
                     print_log=False, allow_missing_keys=True) for name in OUTPUTS),
    ])
    data = pipeline({"image": str(source)})

    summary = data["image_klip"].meta["klip"]
    stem = Path(str(source)).name.removesuffix(".gz").removesuffix(".nii")
    print(f"source          {source}")
    for name in (n for n in OUTPUTS if f"image_{n}" in data):
        units = data[f"image_{name}"].meta["klip"]["units"]
        print(f"{name:<15} {args.out / f'{stem}_{name}.nii.gz'}  ({units})")
    print(f"image score     {summary['score_max']:.4g} nats/pixel (max block density inside the body), "
          f"prior {summary['prior']}, physics {summary['physics']}, "
          f"{args.samples} samples x {args.steps} steps")
    print(f"null model      {summary['null_model']}")
    if "z_max" in summary:
        threshold = summary["z_threshold"]
        print(f"KLIP z          max {summary['z_max']:.2f} inside the head; {threshold['z']:.2f} flags "
              f"{threshold['fpr']:.0%} of healthy blocks")
    if mask_path is not None:
        import nibabel as nib

        klip = data["image_klip"][0].numpy()
        tumour = nib.as_closest_canonical(nib.load(mask_path)).get_fdata() > 0
        body = data["image"][0].numpy() > 0
        print(f"tumour mask     {mask_path}")
        print(f"mean KLIP       {klip[tumour].mean():.4g} in the tumour, {klip[body & ~tumour].mean():.4g} "
              "in the rest of the head (nats/pixel)")
        if "image_klip_z" in data:
            z = data["image_klip_z"][0].numpy()
            print(f"mean KLIP z     {z[tumour].mean():.2f} in the tumour, {z[body & ~tumour].mean():.2f} in the rest "
                  "of the head")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
