"""What ``klip-med run`` reads: a DICOM series (a folder, or a DICOMweb series URL), a NIfTI image
or an ``.npz`` volume, as a :class:`RunInput` (the source grid in physical units, with what is
known about it).

- a DICOMweb series ``http(s)://HOST/ROOT/studies/<StudyUID>/series/<SeriesUID>``: listed with
  QIDO-RS, retrieved with WADO-RS into a temporary folder, read with the checks of a folder, and
  the files deleted (:mod:`klip_med.io.dicomweb`).
- a DICOM folder (searched recursively) or file holding one image series; anonymised series with
  empty Study / Series Instance UIDs get UIDs derived in memory (listed in ``summary.json``).
- a ``.nii`` / ``.nii.gz`` image: 3D, slices along the third voxel axis, HU for CT.
- a ``.npz`` file with key ``image``: ``(Z, H, W)`` or ``(H, W)`` in physical units (HU for CT, MR
  signal for MR). Optional keys: ``modality`` (``"CT"`` / ``"MR"``; default the prior's),
  ``pixel_spacing_mm`` (one number or (row, column); default 1), ``slice_spacing_mm`` (default 1),
  ``mask`` (bool, the shape of ``image``: a known lesion, drawn in the report and scored in
  ``summary.json``), ``mr_scale`` (the prior's per-volume MR scale; default computed from ``image``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klip_med.errors import KLIPMedError, expect
from klip_med.io.dicom.read import read_dicom_series
from klip_med.io.dicomweb import DicomWebOptions, is_dicomweb_url, read_series
from klip_med.io.nifti import read_nifti
from klip_med.io.volume import Volume

NPZ_KEYS = ("image", "modality", "pixel_spacing_mm", "slice_spacing_mm", "mask", "mr_scale")


@dataclass(frozen=True)
class RunInput:
    """A volume to reconstruct, with what is known about it.

    Attributes:
        volume: the source grid ``(Z, H, W)`` in physical units (HU / MR signal), with geometry
            (and the DICOM datasets the outputs will reference, for DICOM input).
        modality: ``"CT"``, ``"MR"`` or ``None`` (unknown: the prior's is assumed).
        format: ``"dicom"``, ``"dicomweb"``, ``"nifti"`` or ``"npz"``.
        truth_mask: optional bool ``(Z, H, W)`` known lesion mask on the source grid.
        mr_scale: optional per-volume MR scale of the prior's rule (default: from the volume).
        description: where it came from, for the summary.
    """

    volume: Volume
    modality: str | None
    format: str
    truth_mask: np.ndarray | None = None
    mr_scale: float | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _npz_input(path: Path) -> RunInput:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except Exception as exc:
        raise KLIPMedError(f"{path}: expected a readable .npz file, found {type(exc).__name__}: {exc}") from exc
    expect("image" in arrays, str(path), f"a key 'image' (keys understood: {', '.join(NPZ_KEYS)})",
           f"keys {sorted(arrays)}")
    image = arrays["image"]
    expect(image.ndim in (2, 3) and np.issubdtype(image.dtype, np.number) and not np.iscomplexobj(image),
           f"{path}: image", "a real (Z, H, W) or (H, W) array", f"{image.dtype} shape {image.shape}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    expect(bool(np.isfinite(image).all()), f"{path}: image", "finite values", "NaN / Inf")
    spacing = np.atleast_1d(arrays.get("pixel_spacing_mm", np.array(1.0))).astype(np.float64)
    expect(spacing.size in (1, 2) and bool(np.all(spacing > 0)), f"{path}: pixel_spacing_mm",
           "one or two positive numbers (mm)", spacing.tolist())
    dr, dc = (float(spacing[0]), float(spacing[-1]))
    dz = float(arrays.get("slice_spacing_mm", np.array(1.0)))
    expect(dz > 0, f"{path}: slice_spacing_mm", "a positive number (mm)", dz)
    modality = str(arrays["modality"]) if "modality" in arrays else None
    expect(modality in (None, "CT", "MR"), f"{path}: modality", "'CT' or 'MR'", modality)
    mask = arrays.get("mask")
    if mask is not None:
        mask = np.asarray(mask).astype(bool).reshape(mask.shape if mask.ndim == 3 else (1, *mask.shape))
        expect(mask.shape == image.shape, f"{path}: mask", f"shape {image.shape[-mask.ndim:]} (the image)",
               mask.shape)
    mr_scale = float(arrays["mr_scale"]) if "mr_scale" in arrays else None
    volume = Volume(image, np.diag([dc, dr, dz, 1.0]), None, str(path))
    return RunInput(volume, modality, "npz", mask, mr_scale, str(path))


def read_input(path: str | Path, dicomweb: DicomWebOptions | None = None) -> RunInput:
    """Read a DICOMweb series URL, a DICOM folder / file, a NIfTI image or a ``.npz`` (see the module
    docstring). ``dicomweb``: credential, TLS, timeout and retries for a URL (default: none, verified
    TLS, 60 s, 3 retries)."""
    if is_dicomweb_url(path):
        options = dicomweb or DicomWebOptions()
        volume = read_series(str(path), options, argument="--input")
        modality = str(volume.datasets[0].get("Modality", "")) or None if volume.datasets else None
        return RunInput(volume, modality, "dicomweb", description=volume.source,
                        extra={"notes": list(volume.notes), "dicomweb": options.describe()})
    p = Path(path)
    expect(p.exists(), "--input", "an existing DICOM folder or file, .nii / .nii.gz or .npz file, or a "
           "DICOMweb series URL http(s)://HOST/ROOT/studies/<StudyUID>/series/<SeriesUID>",
           f"no such path {str(p)!r}")
    name = p.name.lower()
    if p.is_file() and name.endswith(".npz"):
        return _npz_input(p)
    if p.is_file() and name.endswith((".nii", ".nii.gz")):
        return RunInput(read_nifti(p), None, "nifti", description=str(p))
    volume = read_dicom_series(p, derive_missing_uids=True)
    modality = str(volume.datasets[0].get("Modality", "")) or None if volume.datasets else None
    return RunInput(volume, modality, "dicom", description=str(p), extra={"notes": list(volume.notes)})
