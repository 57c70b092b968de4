"""Write a KLIP map as a DICOM Parametric Map (highdicom): float32, nats per pixel.

One multi-frame instance over the whole source series: frame k is derived from source instance k
(highdicom records each frame's source SOPInstanceUID and plane position, and the
ReferencedSeriesSequence), so viewers overlay it on the source series.

Stored values are ``KLIP / scale`` with ``scale`` the top of the display range (the map's 99.5th
percentile by default); the real-world value mapping (slope = ``scale``, unit ``{nats}/{pixel}``,
UCUM) turns them back into nats per pixel. Readers that apply the mapping (highdicom,
:func:`read_parametric_map`) get nats; OHIF v3, which ignores it, multiplies stored values by 100 and
windows them 0..100 (its Parametric Map viewport expects 0..1), so it shows 0 as transparent and
the top of the range in full colour instead of one saturated colour.

Frames are stored in increasing position along the row x column normal of the source, the order of
a cornerstone3D volume: OHIF 3.13 (``@cornerstonejs/adapters`` ParametricMap) lays frame i into
slice i of the referenced volume, whatever the frame's source reference says; highdicom's own
order (the opposite direction) would show the map upside down along the stack.
"""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.uid import generate_uid

from klip_med.errors import KLIPMedError, expect
from klip_med.io.dicom.common import (
    EQUIPMENT,
    on_grid,
    require_dicom,
    save_dataset,
    set_empty_laterality,
    set_slice_spacing,
)
from klip_med.io.volume import Volume

NATS_PER_PIXEL = hd.sr.CodedConcept(value="{nats}/{pixel}", scheme_designator="UCUM",
                                    meaning="nats per pixel")


def write_parametric_map(
    source: Volume,
    klip_map: np.ndarray,
    path: str | os.PathLike[str],
    *,
    window: tuple[float, float] | None = None,
    series_description: str = "KLIP map (nats per pixel)",
    series_number: int = 9002,
    explanation: str = "KL divergence between posterior and prior sampling paths, per pixel",
) -> Path:
    """Write ``klip_map`` ``(Z, H, W)`` (nats per source pixel) as a Parametric Map.

    Args:
        source: the DICOM volume the map sits on (bring working-grid maps back with
            ``to_source_grid(..., kind="density")`` first).
        klip_map: finite float ``(Z, H, W)``; stored as 32-bit float.
        path: output file.
        window: (center, width) display preset in nats per pixel; default spans 0 to the 99.5th
            percentile. Its top ``center + width / 2`` is the stored scale (stored 1.0 = top).
        series_description, series_number, explanation: header values.

    Returns:
        ``path``.
    """
    datasets = require_dicom(source)
    values = on_grid(klip_map, source, "klip_map").astype(np.float32)
    hi = float(values.max())
    if window is None:
        top = float(np.percentile(values, 99.5))
        top = top if top > 0 else max(hi, 1e-6)
        window = (top / 2.0, top)
    center, width = (float(v) for v in window)
    expect(width > 0, "window", "(center, width) with width > 0", window)
    scale = center + width / 2.0
    expect(scale > 0, "window", "(center, width) whose top center + width/2 is > 0 (the stored scale)", window)
    stored = (values / np.float32(scale)).astype(np.float32)
    s_lo, s_hi = float(stored.min()), float(stored.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="KLIP",
        lut_explanation=explanation[:64],
        unit=NATS_PER_PIXEL,
        value_range=(s_lo, s_hi if s_hi > s_lo else s_lo + 1.0),
        slope=scale,
        intercept=0.0,
    )
    pmap = hd.pm.ParametricMap(
        source_images=list(datasets),
        pixel_array=stored,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        **EQUIPMENT,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=center / scale, window_width=width / scale, voi_lut_function="LINEAR_EXACT"
            )
        ],
        content_label="KLIP",
        content_description=series_description[:64],
    )
    _frames_along_normal(pmap)
    pmap.SeriesDescription = series_description
    set_empty_laterality(pmap)
    set_slice_spacing(pmap, source)
    return save_dataset(pmap, path)


def _frames_along_normal(pmap) -> None:
    """Reorder the frames (pixels and per-frame groups together) by increasing position along
    cross(row, column) of ImageOrientationPatient: the slice order of cornerstone3D volumes."""
    groups = list(pmap.PerFrameFunctionalGroupsSequence)
    if len(groups) < 2:
        return
    iop = np.asarray(pmap.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
                     dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    along = [float(np.dot(np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, np.float64), normal))
             for g in groups]
    order = np.argsort(along, kind="stable")
    if np.array_equal(order, np.arange(len(groups))):
        return
    frames = np.frombuffer(pmap.FloatPixelData, dtype="<f4").reshape(len(groups), -1)
    pmap.FloatPixelData = np.ascontiguousarray(frames[order]).tobytes()
    pmap.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]


def _real_world_mapping(pmap) -> tuple[float, float]:
    """(slope, intercept) of the map's first real-world value mapping (shared, else frame 1's)."""
    groups = list(pmap.get("SharedFunctionalGroupsSequence", []))
    groups += list(pmap.get("PerFrameFunctionalGroupsSequence", []))[:1]
    for group in groups:
        for item in group.get("RealWorldValueMappingSequence", []):
            return float(item.get("RealWorldValueSlope", 1.0)), float(item.get("RealWorldValueIntercept", 0.0))
    return 1.0, 0.0


def read_parametric_map(path: str | os.PathLike[str], source: Volume) -> np.ndarray:
    """Read a Parametric Map back onto ``source``'s grid, frames matched by source SOPInstanceUID.

    Returns:
        float32 ``(Z, H, W)`` real-world values (nats per pixel for a KLIP map): stored values
        times the real-world value slope plus its intercept (applied here: highdicom 0.28 fails
        on a slope other than 1).
    """
    require_dicom(source)
    try:
        pmap = hd.pm.ParametricMap.from_dataset(hd.imread(path))
    except Exception as exc:
        raise KLIPMedError(
            f"{path}: expected a DICOM Parametric Map, found {type(exc).__name__}: {exc}"
        ) from exc
    stored = pmap.get_pixels_by_source_instance(
        list(source.sop_instance_uids), dtype=np.float64, apply_real_world_transform=False
    )
    slope, intercept = _real_world_mapping(pmap)
    return (np.asarray(stored, dtype=np.float64) * slope + intercept).astype(np.float32).reshape(source.shape)
