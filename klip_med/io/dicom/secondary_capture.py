"""RGB Secondary Capture of the KLIP heat map fused on the source slices (highdicom), for
viewers without SEG / Parametric Map support. One instance per source slice, same pixel grid,
each referencing its source instance (SourceImageSequence) and carrying PixelSpacing and
PatientOrientation.
"""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from klip_med.errors import expect
from klip_med.io.dicom.common import (
    MANUFACTURER,
    on_grid,
    output_folder,
    patient_orientation,
    require_dicom,
    save_dataset,
    set_empty_laterality,
)
from klip_med.io.volume import Volume


def display_window(ds: Dataset | None, image: np.ndarray) -> tuple[float, float]:
    """(low, high) display range: the source's first WindowCenter/Width, else 1st-99th percentiles."""
    if ds is not None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:  # multi-valued windows: take the first preset
            c = float(np.ravel(np.asarray(ds.WindowCenter, dtype=np.float64))[0])
            w = float(np.ravel(np.asarray(ds.WindowWidth, dtype=np.float64))[0])
            if w > 0:
                return c - w / 2.0, c + w / 2.0
        except (TypeError, ValueError, IndexError):
            pass
    lo, hi = (float(v) for v in np.percentile(image, [1.0, 99.0]))
    return lo, hi if hi > lo else lo + 1.0


def fuse_heatmap(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    window: tuple[float, float],
    heat_range: tuple[float, float],
    cmap: str = "inferno",
    max_alpha: float = 0.6,
) -> np.ndarray:
    """Blend a heat map over a grey-scale slice.

    Args:
        image: ``(H, W)`` slice in modality units, shown in ``window = (low, high)``.
        heat: ``(H, W)`` map (nats per pixel); 0 at ``heat_range[0]`` and below (transparent),
            fully coloured (opacity ``max_alpha``) at ``heat_range[1]``.
        cmap: matplotlib colormap name.

    Returns:
        uint8 ``(H, W, 3)`` RGB.
    """
    img, hm = np.asarray(image, np.float64), np.asarray(heat, np.float64)
    expect(img.ndim == 2 and hm.shape == img.shape, "heat", f"shape {img.shape} (the slice)", hm.shape)
    lo, hi = window
    grey = np.clip((img - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    h0, h1 = heat_range
    expect(h1 > h0, "heat_range", "(low, high) with high > low", heat_range)
    t = np.clip((hm - h0) / (h1 - h0), 0.0, 1.0)
    colour = colormaps[cmap](t)[..., :3]
    alpha = (max_alpha * t)[..., None]
    rgb = (1.0 - alpha) * grey[..., None] + alpha * colour
    return np.round(255.0 * rgb).astype(np.uint8)


def write_secondary_captures(
    source: Volume,
    klip_map: np.ndarray,
    folder: str | os.PathLike[str],
    *,
    background: np.ndarray | None = None,
    heat_range: tuple[float, float] | None = None,
    series_description: str = "KLIP heat map (fused)",
    series_number: int = 9005,
) -> list[Path]:
    """Write one RGB Secondary Capture per slice: the heat map over the source (or ``background``).

    Args:
        source: the DICOM volume.
        klip_map: ``(Z, H, W)`` nats per pixel on the source grid.
        folder: output folder (created); files ``<SOPInstanceUID>.dcm``.
        background: ``(Z, H, W)`` image to fuse on (default: the source pixels; e.g. the recon).
        heat_range: colour scale (nats per pixel); default 0 to the map's 99.5th percentile,
            the same for every slice.

    Returns:
        Written paths in slice order.
    """
    datasets = require_dicom(source)
    heat = on_grid(klip_map, source, "klip_map")
    base = source.pixels if background is None else on_grid(background, source, "background")
    if heat_range is None:
        top = float(np.percentile(heat, 99.5))
        heat_range = (0.0, top if top > 0 else max(float(heat.max()), 1e-6))
    out = output_folder(folder)
    series_uid = generate_uid()
    dr, dc = source.spacing[1], source.spacing[2]
    paths = []
    for k, ref in enumerate(datasets):
        rgb = fuse_heatmap(base[k], heat[k], window=display_window(ref, base[k]), heat_range=heat_range)
        sop_uid = generate_uid()
        orientation = patient_orientation(ref)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=k + 1,
            manufacturer=MANUFACTURER,
            pixel_spacing=(dr, dc),
            patient_orientation=(orientation[0][0], orientation[1][0]),  # highdicom: one letter
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        item = Dataset()
        item.ReferencedSOPClassUID = ref.SOPClassUID
        item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([item])
        sc.SeriesDescription = series_description
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.DerivationDescription = "KLIP heat map (nats per pixel) blended over the source slice"
        sc.BurnedInAnnotation = "NO"
        sc.PatientOrientation = list(orientation)  # full oblique letters, e.g. PL \ FRP
        set_empty_laterality(sc)
        paths.append(save_dataset(sc, out / f"{sop_uid}.dcm"))
    return paths
