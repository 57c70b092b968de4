"""A DICOM series in, viewer overlays out: reconstruction series, Parametric Map, SEG, Secondary Capture.

    python examples/dicom_to_viewer_overlays.py --out overlays_out               # pydicom's CT5N, ~20 s
    python examples/dicom_to_viewer_overlays.py --input my_ct_series/ --samples 4 --steps 50
    python examples/dicom_to_viewer_overlays.py --out overlays_out --threshold p99  # a SEG without a null

Without ``--input`` the script uses the 5-slice CT series bundled with pydicom (``CT5N``, 16 x 16
pixels: tiny, but real DICOM with real geometry and UIDs). It runs ``klip-med run`` through its
Python entry point (:func:`klip_med.cli.main`, exactly what the command line does) with a
simulated sparse-view CT acquisition and the shipped ``ct-abdomen-128`` prior, then lists the
DICOM objects written in ``OUT/dicom/`` and reads the SEG and the Parametric Map back with
highdicom to show they reference the source series: load the source series plus ``dicom/`` into
a viewer (3D Slicer, OHIF, Weasis) and the KLIP map and the OOD mask lie on the source images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import highdicom as hd
import pydicom

from klip_med.cli import main as klip_med_main
from klip_med.io import read_dicom_series

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def referenced_series(ds: pydicom.Dataset) -> list[str]:
    """Series Instance UIDs a derived object points at (Common Instance Reference module)."""
    return [item.SeriesInstanceUID for item in ds.get("ReferencedSeriesSequence", [])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("dicom_overlays_out"), help="output folder")
    parser.add_argument("--input", type=Path, default=CT5N, help="DICOM folder of one CT series "
                        "(default: pydicom's bundled 5-slice CT5N)")
    parser.add_argument("--prior", default="ct-abdomen-128", help="shipped prior name or prior folder")
    parser.add_argument("--physics", default="ct-sparse:views=24,noise=0.5")
    parser.add_argument("--samples", type=int, default=1, help="posterior samples per slice")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--threshold", default="auto",
                        help="OOD mask rule (klip-med run --threshold). auto writes a SEG only where a null model "
                             "for these settings exists; 'p99' flags this volume's top 1%% of blocks, uncalibrated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    code = klip_med_main(["run", "--input", str(args.input), "--physics", args.physics, "--prior", args.prior,
                          "--out", str(args.out), "--samples", str(args.samples), "--steps", str(args.steps),
                          "--seed", str(args.seed), "--device", args.device, "--threshold", args.threshold,
                          "--no-progress"])
    if code != 0:
        raise SystemExit(code)

    source = read_dicom_series(args.input, derive_missing_uids=True)
    source_series = source.datasets[0].SeriesInstanceUID
    summary = json.loads((args.out / "summary.json").read_text(encoding="utf-8"))
    print(f"\nsource series   {args.input} ({source.shape[0]} slices, {source.shape[1]}x{source.shape[2]}), "
          f"SeriesInstanceUID {source_series}")
    print("DICOM objects written:")
    for path in sorted((args.out / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        print(f"  {path.relative_to(args.out)!s:<40} {ds.Modality:<3} {ds.SOPClassUID.name}")

    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(args.out / "dicom" / "klip_pm.dcm"))
    objects = [("Parametric Map", pm)]
    seg_path = args.out / "dicom" / "klip_seg.dcm"
    seg = hd.seg.segread(seg_path) if seg_path.is_file() else None
    if seg is None:
        print(f"SEG             none: {summary['threshold'].get('meaning', summary['threshold'])}")
    else:
        objects.insert(0, ("SEG", seg))
    for name, ds in objects:
        refs = referenced_series(ds)
        same = "matches the source" if refs == [source_series] else "DOES NOT match the source"
        print(f"{name:<15} same frame of reference: {ds.FrameOfReferenceUID == source.datasets[0].FrameOfReferenceUID}, "
              f"referenced series {', '.join(refs) or 'none'} ({same})")
    if seg is not None:
        labels = {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence}
        print(f"SEG segments    {labels}, {seg.number_of_frames} frames")
    print(f"image score     {summary['score']['max_nats_per_pixel']:.4g} nats/pixel (max block density inside "
          f"the body), prior {summary['prior']['name']}, physics {summary['physics']['spec']}")
    print(f"outputs         {args.out} (summary.json, recon.nii.gz, klip.nii.gz, report.png, dicom/)")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
