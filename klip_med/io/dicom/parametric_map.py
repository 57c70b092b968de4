"""Write a KLIP map as a DICOM Parametric Map (highdicom): float32, nats per pixel.

One multi-frame instance; frame k is derived from source instance k (highdicom records each
frame's source SOPInstanceUID and plane position), so viewers overlay it on the source series.
The real-world value mapping is the identity with unit ``{nats}/{pixel}`` (UCUM annotation).
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
        window: (center, width) preset; default spans 0 to the 99.5th percentile.
        series_description, series_number, explanation: header values.

    Returns:
        ``path``.
    """
    datasets = require_dicom(source)
    values = on_grid(klip_map, source, "klip_map").astype(np.float32)
    lo, hi = float(values.min()), float(values.max())
    if window is None:
        top = float(np.percentile(values, 99.5))
        top = top if top > 0 else max(hi, 1e-6)
        window = (top / 2.0, top)
    center, width = (float(v) for v in window)
    expect(width > 0, "window", "(center, width) with width > 0", window)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="KLIP",
        lut_explanation=explanation[:64],
        unit=NATS_PER_PIXEL,
        value_range=(lo, hi if hi > lo else lo + 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pmap = hd.pm.ParametricMap(
        source_images=list(datasets),
        pixel_array=values,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        **EQUIPMENT,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=center, window_width=width, voi_lut_function="LINEAR_EXACT"
            )
        ],
        content_label="KLIP",
        content_description=series_description[:64],
    )
    pmap.SeriesDescription = series_description
    set_empty_laterality(pmap)
    set_slice_spacing(pmap, source)
    return save_dataset(pmap, path)


def read_parametric_map(path: str | os.PathLike[str], source: Volume) -> np.ndarray:
    """Read a Parametric Map back onto ``source``'s grid, frames matched by source SOPInstanceUID.

    Returns:
        float32 ``(Z, H, W)`` real-world values (nats per pixel for a KLIP map).
    """
    require_dicom(source)
    try:
        pmap = hd.pm.ParametricMap.from_dataset(hd.imread(path))
    except Exception as exc:
        raise KLIPMedError(
            f"{path}: expected a DICOM Parametric Map, found {type(exc).__name__}: {exc}"
        ) from exc
    pixels = pmap.get_pixels_by_source_instance(
        list(source.sop_instance_uids), dtype=np.float32, apply_real_world_transform=True
    )
    return np.asarray(pixels, dtype=np.float32).reshape(source.shape)

