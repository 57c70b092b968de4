"""Write a reconstruction as a new derived DICOM series on the source grid (pydicom).

Each output instance is a copy of its source instance's header (same SOP class, modality,
geometry, frame of reference, study) with a new series, new SOP instance UID, ImageType
``DERIVED\\SECONDARY``, a SourceImageSequence pointing at that source instance, private tags
removed, and new pixel data (16-bit, Explicit VR Little Endian).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from klip_med.errors import expect
from klip_med.io.dicom.common import (
    MANUFACTURER,
    SOFTWARE_VERSION,
    on_grid,
    output_folder,
    require_dicom,
    save_dataset,
    set_empty_laterality,
)
from klip_med.io.volume import Volume

_REMOVE = (
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "ReferencedImageSequence", "SourceImageSequence", "DerivationCodeSequence",
    "IconImageSequence", "RequestAttributesSequence",
)


def _rescale(values: np.ndarray, ds: Dataset) -> tuple[float, float] | None:
    """(slope, intercept) storing ``values`` in int16, or None to store rounded values as they are."""
    lo, hi = float(values.min()), float(values.max())
    if "RescaleSlope" not in ds and ds.get("Modality") != "CT":
        return None
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if slope > 0 and (lo - intercept) / slope >= -32768 and (hi - intercept) / slope <= 32767:
        return slope, intercept
    slope = max((hi - lo) / 65534.0, 1e-6)
    return slope, (lo + hi) / 2.0


def stored_values(values: np.ndarray, ds: Dataset, where: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Pixel values as stored integers (int16, or uint16 for large non-negative MR values)."""
    rescale = _rescale(values, ds)
    if rescale is None:
        rounded = np.rint(values)
        lo, hi = float(rounded.min()), float(rounded.max())
        dtype = np.int16 if lo >= -32768 and hi <= 32767 else np.uint16
        expect(lo >= np.iinfo(dtype).min and hi <= np.iinfo(dtype).max, where,
               "values storable in 16 bits (modality units; no RescaleSlope in the source)",
               f"range [{lo}, {hi}]")
        return rounded.astype(dtype), None
    slope, intercept = rescale
    return np.clip(np.rint((values - intercept) / slope), -32768, 32767).astype(np.int16), rescale


def write_derived_series(
    source: Volume,
    pixels: np.ndarray,
    folder: str | os.PathLike[str],
    *,
    series_description: str = "KLIP reconstruction",
    series_number: int = 9001,
    derivation_description: str = "Diffusion posterior reconstruction (klip_med)",
) -> list[Path]:
    """Write ``pixels`` (on the source grid) as a new series, one file per source instance.

    Args:
        source: the DICOM volume the reconstruction sits on.
        pixels: float ``(Z, H, W)`` in the source's modality units (HU for CT). Stored as int16
            with the source's RescaleSlope/Intercept when the range allows (else a fitted
            rescale); modalities without rescale (MR) are rounded to integers.
        folder: output folder (created); files are named ``<SOPInstanceUID>.dcm``.
        series_description, series_number, derivation_description: header values.

    Returns:
        The written paths, in slice order.
    """
    datasets = require_dicom(source)
    values = on_grid(pixels, source, "pixels").astype(np.float64)
    out = output_folder(folder)
    series_uid = generate_uid()
    now = dt.datetime.now()
    paths = []
    for k, src in enumerate(datasets):
        ds = copy.deepcopy(src)
        ds.remove_private_tags()
        for keyword in _REMOVE:
            if keyword in ds:
                delattr(ds, keyword)
        stored, rescale = stored_values(values[k], src, f"pixels[{k}]")
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.InstanceNumber = k + 1
        kind = list(src.get("ImageType", ["ORIGINAL", "PRIMARY"]))
        ds.ImageType = ["DERIVED", "SECONDARY", *kind[2:]]
        ds.DerivationDescription = derivation_description
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        ds.SourceImageSequence = DicomSequence([ref])
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.SoftwareVersions = f"{MANUFACTURER} {SOFTWARE_VERSION}"
        set_empty_laterality(ds)
        ds.SamplesPerPixel = 1
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        if rescale is not None:
            ds.RescaleSlope = f"{rescale[0]:.10g}"
            ds.RescaleIntercept = f"{rescale[1]:.10g}"
            if "RescaleType" not in ds and ds.get("Modality") == "CT":
                ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        paths.append(save_dataset(ds, out / f"{sop_uid}.dcm"))
    return paths
