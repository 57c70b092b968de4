"""The demo (``klip-med demo``): a bundled real case, measured, reconstructed with a shipped prior, scored, written.

Cases (both inside the package, ``klip_med/cases/``; attribution and licence in their JSON):

``mri`` (default)
    One FLAIR slice with a low-grade glioma (TCGA-LGG, patient ``TCGA_HT_7616``, held out from the
    prior's training), 128 x 128, nominal 1.875 mm pixels. It is first written as a DICOM MR image
    in ``OUT/dicom/source/`` so the DICOM outputs have an image to lie on. Measured with
    :data:`MRI_PHYSICS` (4x Cartesian undersampling, 8 % fully sampled centre, Gaussian noise 0.01)
    and reconstructed with ``mri-brain-flair-128``. Truth: the published tumour mask.
``ct``
    One abdominal CT slice through the liver (TotalSegmentator test data, Apache-2.0), 512 x 512.
    A hypo-dense lesion (:data:`CT_LESION`: 25 mm, -40 HU, fixed seed) is inserted in the liver on
    the source grid and the result written as a derived CT in ``OUT/dicom/source/`` (referencing the
    shipped slice). Measured on the 128 x 128 working grid with :data:`CT_PHYSICS` (60-view
    parallel-beam sparse-view CT, Gaussian noise 0.5) and reconstructed with ``ct-abdomen-128``.
    Truth: the lesion's half-maximum mask.

Default settings (:data:`DEMO_SETTINGS`: 4 samples x 50 steps of the fast sampler, 200 network
calls) take about a minute on a 2-core laptop CPU. Everything else is ``klip-med run`` on a one-slice
volume (:func:`klip_med.pipeline.run_volume`), so the outputs are those of :mod:`klip_med.io.outputs`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from klip_med.errors import expect

CASES = ("mri", "ct")
MRI_PHYSICS = "mri:accel=4,center=0.08,noise=0.01"
CT_PHYSICS = "ct-sparse:views=60,noise=0.5"
NOMINAL_SLICE_THICKNESS_MM = 5.0
"""Written into the MRI source header (the published slices carry no geometry; see the case JSON)."""
PRIORS = {"mri": "mri-brain-flair-128", "ct": "ct-abdomen-128"}
DEMO_SETTINGS = {"samples": 4, "steps": 50, "sampler": "fast", "seed": 0}
"""The demo's sampler settings (the rest as in :class:`klip_med.pipeline.KLIPSettings`)."""
CT_LESION = {"diameter_mm": 25.0, "contrast_hu": -40.0, "seed": 2026}
"""The inserted liver lesion: diameter (mm), mean change over its core (HU), placement seed."""
# (heavy imports -- torch, pydicom, highdicom -- stay inside the functions: `klip-med --help` is fast)


def case_file(*parts: str) -> Path:
    """A bundled file ``klip_med/cases/<parts>``; :class:`KLIPMedError` if the install lacks it."""
    path = Path(str(resources.files("klip_med").joinpath("cases", *parts)))
    expect(path.is_file(), "demo case", f"the bundled file klip_med/cases/{'/'.join(parts)}",
           "it is missing (reinstall klip-med)")
    return path


# ----------------------------------------------------------------------------- MRI case


def bundled_mri_slice(prior, device: str = "cpu"):
    """The bundled TCGA-LGG FLAIR slice in ``prior``'s units and its tumour mask.

    Returns ``(truth, tumour)``: ``truth`` an (H, W) float32 tensor on ``device`` in [-1, 1] (the
    volume's MR scale applied), and ``tumour`` the (H, W) bool numpy mask.
    The examples that drive a sampler by hand start from it.
    """
    import torch

    with np.load(case_file("lgg_flair_demo.npz")) as case:
        flair, tumour, scale = case["flair"], case["mask"].astype(bool), float(case["volume_mr_scale"])
    model = prior.config.intensity.to_model(flair.astype(np.float32), scale)
    truth = torch.as_tensor(model, dtype=torch.float32, device=device)
    return truth, tumour


def write_mr_source(flair: np.ndarray, spacing_mm: float, folder: Path, info: dict[str, Any]) -> Path:
    """Write a 2D MR slice as a single-frame DICOM MR Image (pydicom), ``folder/<SOPInstanceUID>.dcm``.

    The slice is axial (identity orientation, head first supine) at the origin with ``spacing_mm``
    pixels and a nominal :data:`NOMINAL_SLICE_THICKNESS_MM`; UIDs are
    derived from the case name, so every demo run writes the same source image. The pixel values
    are the published 8-bit FLAIR values (unsigned 16-bit storage, no rescale).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    from klip_med.io.dicom.common import save_dataset, set_empty_laterality

    seed = ["klip-med demo", str(info.get("patient")), str(info.get("slice_number"))]
    uid = {k: generate_uid(entropy_srcs=[*seed, k]) for k in ("study", "series", "frame", "instance")}
    now = dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = uid["instance"]
    ds.PatientName = "KLIP^Demo"
    ds.PatientID = "KLIP-DEMO-MRI"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "TCGA public release (case id in ImageComments)"
    ds.StudyInstanceUID = uid["study"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "klip-med demo: brain FLAIR with low-grade glioma"
    ds.Modality = "MR"
    ds.PatientPosition = "HFS"
    ds.SeriesInstanceUID = uid["series"]
    ds.SeriesNumber = 1
    ds.SeriesDescription = "FLAIR (TCGA-LGG, 2x2 downsampled)"
    set_empty_laterality(ds)
    ds.FrameOfReferenceUID = uid["frame"]
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = ""
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.DerivationDescription = "2x2 mean-downsampled, 8-bit scaled FLAIR as published (Buda et al. 2019)"
    ds.ImageComments = (f"{info.get('patient')} slice {info.get('slice_number')}; licence "
                        f"{info.get('licence', '')}; pixel spacing and slice thickness are nominal")[:10240]
    ds.ScanningSequence = ["SE", "IR"]
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = ""
    ds.EchoTime = ""
    ds.InversionTime = ""
    ds.EchoTrainLength = ""
    ds.SliceThickness = f"{NOMINAL_SLICE_THICKNESS_MM:g}"  # nominal: the source states none
    ds.PixelSpacing = [f"{spacing_mm:.6g}", f"{spacing_mm:.6g}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(v) for v in flair.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(flair, dtype=np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    folder.mkdir(parents=True, exist_ok=True)
    return save_dataset(ds, folder / f"{ds.SOPInstanceUID}.dcm")


def mri_case(out: Path) -> tuple[Any, dict[str, Any]]:
    """The MRI case, its source written to ``out/dicom/source/``."""
    from klip_med.io.dicom.read import read_dicom_series
    from klip_med.io.inputs import RunInput

    info = json.loads(case_file("lgg_flair_demo.json").read_text(encoding="utf-8"))
    with np.load(case_file("lgg_flair_demo.npz")) as data:
        flair, mask, scale = data["flair"], data["mask"].astype(bool), float(data["volume_mr_scale"])
    source_dir = out / "dicom" / "source"
    write_mr_source(flair, float(info["pixel_spacing_mm_nominal"]), source_dir, info)
    volume = read_dicom_series(source_dir)
    case = {"case": "mri", "attribution": {k: info[k] for k in ("patient", "source", "licence", "split")},
            "physics_note": "4x Cartesian undersampling with an 8% fully sampled centre, noise 0.01"}
    return RunInput(volume, "MR", "dicom", mask[None], scale, "bundled case lgg_flair_demo"), case


# ----------------------------------------------------------------------------- CT case


def ct_case(out: Path) -> tuple[Any, dict[str, Any]]:
    """The CT case with its inserted lesion, written as a derived CT in ``out/dicom/source/``."""
    from klip_med.data.lesions import insert_ct_lesion
    from klip_med.io.dicom.output_set import write_series_folder
    from klip_med.io.dicom.read import read_dicom_series
    from klip_med.io.dicom.series import write_derived_series
    from klip_med.io.inputs import RunInput

    info = json.loads(case_file("ct_abdomen_demo", "case.json").read_text(encoding="utf-8"))
    shipped = read_dicom_series(case_file("ct_abdomen_demo", "ct_slice.dcm"), derive_missing_uids=True)
    with np.load(case_file("ct_abdomen_demo", "liver_mask.npz")) as data:
        liver = data["liver"].astype(bool)
    rng = np.random.default_rng(CT_LESION["seed"])
    inserted = insert_ct_lesion(shipped.pixels[0], shipped.spacing[1:], rng,
                                diameter_mm=CT_LESION["diameter_mm"], contrast_hu=CT_LESION["contrast_hu"],
                                placement_mask=liver)
    description = (f"klip-med demo: synthetic hypo-dense lesion ({CT_LESION['diameter_mm']} mm, "
                   f"{CT_LESION['contrast_hu']} HU) inserted in the liver")
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    write_series_folder(out / "dicom", "source", lambda folder: write_derived_series(
        shipped, inserted.image[None], folder, series_description="Demo CT with a synthetic liver lesion",
        series_number=2, derivation_description=description))
    volume = read_dicom_series(out / "dicom" / "source")
    lesion = inserted.lesion
    case = {"case": "ct", "attribution": {"source": info["source"], "licence": info["licence"]},
            "lesion": {"kind": lesion.kind, "centre_row_col": list(lesion.centre),
                       "diameter_mm": lesion.diameter_mm, "contrast_hu": lesion.contrast,
                       "mask_pixels": lesion.mask_pixels, "seed": CT_LESION["seed"]}}
    return RunInput(volume, "CT", "dicom", inserted.mask[None], None, "bundled case ct_abdomen_demo"), case


def run_demo(
    out: str | Path,
    case: str = "mri",
    *,
    device: str = "cpu",
    settings=None,
    threshold: str = "auto",
    progress: bool = True,
    null: str | None = "auto",
    windows=None,
) -> dict[str, Any]:
    """Run a demo case end to end and write its outputs in ``out``; returns the summary.

    Args:
        out: output folder (created). A rerun with the same settings resumes / rewrites in place.
        case: ``"mri"`` or ``"ct"``.
        device: ``"cpu"`` or ``"cuda"``.
        settings: a :class:`klip_med.pipeline.KLIPSettings` (default :func:`demo_settings`).
        threshold: OOD mask threshold (:func:`klip_med.calibration.thresholds.parse_threshold`; default ``auto``).
        null: null model (:attr:`klip_med.pipeline.RunOptions.null`; default ``auto``: the one shipped for
            the demo's settings).
        windows: window specs (default :func:`klip_med.pipeline.default_windows`).
    """
    from klip_med import priors
    from klip_med.pipeline.slice_store import SLICES_DIR, prepare_out
    from klip_med.pipeline.volume import RunOptions, run_volume

    settings = demo_settings() if settings is None else settings
    expect(case in CASES, "--case", f"one of {', '.join(CASES)}", repr(case))
    started = time.perf_counter()
    out_dir = prepare_out(out)
    physics = MRI_PHYSICS if case == "mri" else CT_PHYSICS
    options = RunOptions(physics, settings, slice_batch=1, threshold=threshold, device=device, null=null)
    shutil.rmtree(out_dir / SLICES_DIR, ignore_errors=True)  # a demo always starts afresh
    out_dir.mkdir(parents=True, exist_ok=True)
    run_input, info = (mri_case if case == "mri" else ct_case)(out_dir)
    prior = priors.load(PRIORS[case], device=device)
    from dataclasses import replace

    from klip_med.pipeline.settings import check_windows, default_windows, parse_window

    chosen = (default_windows(prior, settings) if windows is None
              else tuple(parse_window(w, prior.alphas_cumprod) for w in windows))
    options = replace(options, settings=replace(settings, windows=chosen))
    check_windows(prior, options.settings)
    prepare_s = round(time.perf_counter() - started, 2)
    source = sorted(str(p.relative_to(out_dir)) for p in (out_dir / "dicom" / "source").glob("*.dcm"))
    summary_extra = {"command": "demo", "demo": info, "timings": {"prepare_s": prepare_s},
                     "outputs": {"source_dicom": source}}
    return run_volume(run_input, prior, options, out_dir, prior_reference=PRIORS[case], progress=progress,
                      summary_extra=summary_extra, title=f"klip-med demo ({case})")


def demo_settings(**changes: Any):
    """:data:`DEMO_SETTINGS` as :class:`klip_med.pipeline.KLIPSettings`, with ``changes`` (None: keep)."""
    from klip_med.pipeline.settings import KLIPSettings

    values = {**DEMO_SETTINGS, **{k: v for k, v in changes.items() if v is not None}}
    return KLIPSettings(**values)
