"""Helpers shared by the DICOM writers: argument checks, equipment identity, atomic save."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from klip_med import __version__
from klip_med._atomic import atomic_path
from klip_med.errors import expect
from klip_med.io.volume import Volume

MANUFACTURER = "klip_med"
MODEL = "klip_med"
SOFTWARE_VERSION = __version__
DEVICE_SERIAL = "0"
EQUIPMENT = {"manufacturer": MANUFACTURER, "manufacturer_model_name": MODEL,
             "software_versions": SOFTWARE_VERSION, "device_serial_number": DEVICE_SERIAL}
"""The equipment keyword arguments of every highdicom object this package writes."""


def require_dicom(source: Volume, argument: str = "source") -> tuple[Dataset, ...]:
    """The source datasets; raise when the volume did not come from DICOM."""
    expect(source.datasets is not None, argument,
           "a Volume read from DICOM (its source datasets are referenced)",
           f"a volume without DICOM sources ({source.source!r})")
    assert source.datasets is not None
    return source.datasets


def on_grid(values: np.ndarray, source: Volume, argument: str) -> np.ndarray:
    """``values`` as an array on ``source``'s ``(Z, H, W)`` grid, finite; raise otherwise."""
    arr = np.asarray(values)
    if arr.ndim == 2 and source.shape[0] == 1:
        arr = arr[None]
    expect(arr.shape == source.shape, argument,
           f"shape {source.shape} (the source grid: slices, rows, columns)", f"shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        expect(bool(np.all(np.isfinite(arr))), argument, "finite values", "NaN / Inf")
    return arr


def output_folder(folder: str | os.PathLike[str]) -> Path:
    """Create (if needed) and return an output folder."""
    path = Path(folder)
    expect(not path.is_file(), "folder", "a folder for the series files", f"a file {path}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_dataset(dataset: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write a DICOM Part 10 file atomically (temp file in the same folder, then rename)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return target


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """PatientOrientation letters (row, column direction) from ImageOrientationPatient (LPS).

    Letters are ordered by the size of the direction cosine (e.g. an oblique row: ``"PL"``).
    """
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def axis(v: np.ndarray) -> str:
        idx = np.argsort(-np.abs(v))
        return "".join(letters[i][0 if v[i] > 0 else 1] for i in idx if abs(v[i]) > 1e-4)[:3]

    return axis(iop[:3]), axis(iop[3:])


def set_empty_laterality(ds: Dataset) -> None:
    """Laterality (General Series, type 2C) present and empty (= unknown) unless a laterality is set.

    highdicom omits it; dciodvfy then reports the type 2C attribute as missing.
    """
    if "Laterality" not in ds and "ImageLaterality" not in ds:
        ds.Laterality = None



def set_slice_spacing(ds: Dataset, source: Volume) -> None:
    """SpacingBetweenSlices of a multi-frame object = the spacing of the source *positions*.

    highdicom copies the source header's value, which can be stale (e.g. 5 mm written on a 3 mm
    stack); readers that trust it (dcmqi) then misplace frames. Fixed in the shared and any
    per-frame PixelMeasuresSequence.
    """
    if source.shape[0] < 2:
        return
    value = f"{source.spacing[0]:.10g}"
    groups = list(ds.get("SharedFunctionalGroupsSequence", []))
    groups += list(ds.get("PerFrameFunctionalGroupsSequence", []))
    for group in groups:
        for measures in group.get("PixelMeasuresSequence", []):
            measures.SpacingBetweenSlices = value
