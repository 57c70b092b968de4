"""Write and read DICOM Segmentations (highdicom) on a source series.

Binary SEGs come from a mask or an integer label map (one segment per label); fractional SEGs
from values in [0, 1]. Frames reference their source instances by SOPInstanceUID (highdicom
records the source image and plane position of every frame); reading back matches frames to the
source volume through those UIDs, never by frame index.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from klip_med.errors import KLIPMedError, expect
from klip_med.io.dicom.common import (
    EQUIPMENT,
    on_grid,
    require_dicom,
    save_dataset,
    set_slice_spacing,
)
from klip_med.io.volume import Volume

OOD_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
OOD_TYPE = codes.SCT.Abnormal
ANATOMY_CATEGORY = codes.SCT.AnatomicalStructure
ANATOMY_TYPE = codes.SCT.Organ
_ALGORITHM = hd.AlgorithmIdentificationSequence(
    name="klip_med KLIP", version=EQUIPMENT["software_versions"], family=codes.cid7162.ArtificialIntelligence
)


def _color(number: int) -> hd.color.CIELabColor:
    """Distinct display colours: red first (OOD), then a matplotlib tab20 cycle."""
    from matplotlib import colormaps

    rgb = (1.0, 0.0, 0.0) if number == 1 else colormaps["tab20"]((number - 2) % 20)[:3]
    return hd.color.CIELabColor.from_rgb(*(int(round(255 * c)) for c in rgb))


def _descriptions(
    labels: list[int], names: Mapping[int, str], category: hd.sr.CodedConcept, kind: hd.sr.CodedConcept
) -> list[hd.seg.SegmentDescription]:
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(names.get(label, f"label {label}"))[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_ALGORITHM,
            display_color=_color(number),
        )
        for number, label in enumerate(labels, start=1)
    ]


def _write(
    source: Volume, pixel_array: np.ndarray, descriptions: list[hd.seg.SegmentDescription],
    path: str | os.PathLike[str], seg_type: str, series_description: str, series_number: int,
    **extra: object,
) -> Path:
    seg = hd.seg.Segmentation(
        source_images=list(require_dicom(source)),
        pixel_array=pixel_array,
        segmentation_type=seg_type,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        **EQUIPMENT,
        series_description=series_description[:64],
        omit_empty_frames=False,
        **extra,
    )
    set_slice_spacing(seg, source)
    return save_dataset(seg, path)


def write_seg(
    source: Volume,
    labels: np.ndarray,
    path: str | os.PathLike[str],
    *,
    names: Mapping[int, str] | None = None,
    category: hd.sr.CodedConcept = OOD_CATEGORY,
    property_type: hd.sr.CodedConcept = OOD_TYPE,
    series_description: str = "KLIP OOD segmentation",
    series_number: int = 9003,
) -> Path:
    """Write a binary SEG from a mask or an integer label map on the source grid.

    Args:
        source: the DICOM volume the labels sit on.
        labels: bool or non-negative integer ``(Z, H, W)``; 0 is background, every other value
            becomes one segment (numbered 1..N in increasing label order).
        path: output file.
        names: segment label per label value (default ``"label <value>"``; ``"OOD"`` for a mask).
        category, property_type: coded segmented property (defaults: morphologically abnormal
            structure / abnormal; use ``ANATOMY_CATEGORY`` / ``ANATOMY_TYPE`` for organs).

    Returns:
        ``path``. Segment numbers map to label values as in :func:`seg_label_values`.
    """
    arr = on_grid(labels, source, "labels")
    if arr.dtype == bool:
        names = {1: "OOD"} if names is None else names
        arr = arr.astype(np.uint8)
    expect(np.issubdtype(arr.dtype, np.integer) and (arr.size == 0 or int(arr.min()) >= 0),
           "labels", "a bool mask or non-negative integer labels", f"dtype {arr.dtype}, min {arr.min()}")
    values = [int(v) for v in np.unique(arr) if v != 0]
    expect(bool(values), "labels", "at least one labelled pixel", "all zero")
    expect(len(values) <= 65535, "labels", "at most 65535 distinct labels", len(values))
    lookup = np.zeros(int(arr.max()) + 1, dtype=np.uint16)
    lookup[values] = np.arange(1, len(values) + 1, dtype=np.uint16)
    numbered = lookup[arr]
    pixel_array = numbered.astype(np.uint8 if len(values) < 256 else np.uint16)
    descriptions = _descriptions(values, names or {}, category, property_type)
    return _write(source, pixel_array, descriptions, path, "BINARY", series_description, series_number)


def write_fractional_seg(
    source: Volume,
    fraction: np.ndarray,
    path: str | os.PathLike[str],
    *,
    name: str = "OOD",
    fractional_type: str = "PROBABILITY",
    category: hd.sr.CodedConcept = OOD_CATEGORY,
    property_type: hd.sr.CodedConcept = OOD_TYPE,
    series_description: str = "KLIP OOD fractional segmentation",
    series_number: int = 9004,
) -> Path:
    """Write a one-segment fractional SEG (values in [0, 1], stored in 8 bits: steps of 1/255).

    ``fractional_type`` is ``"PROBABILITY"`` or ``"OCCUPANCY"``; the caller says which the values are.
    """
    arr = on_grid(fraction, source, "fraction").astype(np.float32)
    expect(bool(np.all((arr >= 0) & (arr <= 1))), "fraction", "values in [0, 1]",
           f"range [{arr.min()}, {arr.max()}]")
    expect(fractional_type in ("PROBABILITY", "OCCUPANCY"), "fractional_type",
           "'PROBABILITY' or 'OCCUPANCY'", fractional_type)
    descriptions = _descriptions([1], {1: name}, category, property_type)
    return _write(source, arr[..., None], descriptions, path, "FRACTIONAL", series_description,
                  series_number, fractional_type=fractional_type, max_fractional_value=255)


def write_ood_seg(
    source: Volume, klip_map: np.ndarray, threshold: float, path: str | os.PathLike[str], **kwargs: object
) -> Path:
    """Binary SEG of the pixels whose KLIP value (nats per pixel) is ``>= threshold``."""
    values = on_grid(klip_map, source, "klip_map")
    expect(np.isfinite(threshold), "threshold", "a finite number (nats per pixel)", threshold)
    mask = values >= threshold
    expect(bool(mask.any()), "threshold", f"a value reached by the map (max {values.max():.4g})",
           threshold)
    return write_seg(source, mask, path, **kwargs)  # type: ignore[arg-type]


def read_seg(path: str | os.PathLike[str], source: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """Read a SEG back onto ``source``'s grid, frames matched by source SOPInstanceUID.

    Returns:
        ``(values, names)``: for a binary SEG, uint16 ``(Z, H, W)`` segment numbers (0 = none)
        and ``{segment number: segment label}``; for a fractional SEG, float32 ``(Z, H, W)`` in
        [0, 1] of its first segment.
    """
    require_dicom(source)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise KLIPMedError(f"{path}: expected a DICOM Segmentation, found {type(exc).__name__}: {exc}") from exc
    numbers = [int(n) for n in seg.get_segment_numbers()]
    names = {n: str(seg.get_segment_description(n).segment_label) for n in numbers}
    uids = list(source.sop_instance_uids)
    if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        frac = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers[:1], dtype=np.float32)
        return np.asarray(frac[..., 0], dtype=np.float32), names
    combined = seg.get_pixels_by_source_instance(uids, combine_segments=True, dtype=np.uint16)
    return np.asarray(combined, dtype=np.uint16), names


def seg_label_values(labels: np.ndarray) -> dict[int, int]:
    """``{segment number: label value}`` as :func:`write_seg` numbers the labels."""
    return {i + 1: int(v) for i, v in enumerate(v for v in np.unique(np.asarray(labels)) if v != 0)}
