"""One inserted shift of a named kind into a real slice in physical units (HU, MR signal): which
lesion tool, which contrast range, which region and which sizes (rule 6 of
:mod:`klip_med.data.selection`).

=========== =============================================== ==================================================
kind        MR (FLAIR)                                      CT (HU)
=========== =============================================== ==================================================
bright      hyperintense lesion with oedema, in the head    hyperdense +40..+80 HU, in solid soft tissue
hypo        CSF-like cavity (fluid level 2-8 % of range)    hypodense -80..-40 HU, in solid soft tissue
texture     zero-mean texture, std 8-15 % of the range       zero-mean texture, std 25-50 HU, in soft tissue
star        star, +-15..40 % of the range, in the head      star, +-100..300 HU, in the body
metal       (refused)                                       2000-3000 HU object, 3-10 mm (>= 2 px), in the body
=========== =============================================== ==================================================

Round kinds (bright, hypo, texture) draw their diameter uniformly between the smallest that holds
``min_px`` pixels and the kind's largest (capped by the room the region leaves); stars and metal
objects keep their own size ranges.
"""

from __future__ import annotations

import math

import numpy as np

from klip_med.data.lesions import (
    CT_DIAMETER_RANGE_MM,
    CT_HYPERDENSE_RANGE_HU,
    CT_HYPODENSE_RANGE_HU,
    FLAIR_DIAMETER_RANGE_MM,
    METAL_DIAMETER_RANGE_MM,
    STAR_CONTRAST_RANGE,
    STAR_CONTRAST_RANGE_HU,
    STAR_DIAMETER_RANGE_MM,
    TEXTURE_AMPLITUDE_RANGE,
    TEXTURE_AMPLITUDE_RANGE_HU,
    TEXTURE_DIAMETER_RANGE_MM,
    Inserted,
    head_region,
    insert_ct_lesion,
    insert_flair_cavity,
    insert_flair_lesion,
    insert_metal,
    insert_star,
    insert_texture,
    largest_inscribed_radius_mm,
    soft_tissue_mask_ct,
)
from klip_med.data.masks import BODY_LEVEL_HU, body_mask
from klip_med.errors import KLIPMedError, expect

KINDS = ("bright", "hypo", "texture", "star", "metal")
IRREGULAR = 1.15
"""Room factor of a round lesion's irregular boundary (``1 + irregularity``)."""


def _diameter(rng: np.random.Generator, size_range, region: np.ndarray, spacing, spread: float, min_px: int,
              what: str) -> float:
    """A diameter between the one holding ``min_px`` pixels and the range's top, within the room
    ``region`` leaves for a lesion reaching ``spread`` times its radius."""
    room = 2.0 * largest_inscribed_radius_mm(region, spacing) / spread
    low = max(size_range[0], 2.0 * math.sqrt(min_px / math.pi) * max(spacing) * 1.05, 2.02 * max(spacing))
    high = min(max(size_range[1], low * 1.2), 0.99 * room)
    if low > high:
        raise KLIPMedError(f"{what}: expected room for a lesion of >= {min_px} pixels ({low:.1f} mm), found a "
                           f"region that holds {high:.1f} mm")
    return float(rng.uniform(low, high))


def insert_shift(image: np.ndarray, pixel_spacing_mm: tuple[float, float], rng: np.random.Generator, modality: str,
                 kind: str, min_px: int = 30, intensity_range: tuple[float, float] = (0.0, 255.0)) -> Inserted:
    """Insert one shift of ``kind`` (see the module table) into ``image`` (H, W), physical units.

    Args:
        modality: ``"MR"`` or ``"CT"``.
        min_px: smallest mask of a round kind, pixels.
        intensity_range: MR only: the range the image lives in (the output is clipped to it).
    """
    expect(kind in KINDS, "shift", f"one of {list(KINDS)}", kind)
    expect(modality in ("MR", "CT"), "modality", "MR or CT", modality)
    spacing = tuple(float(v) for v in np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=float), (2,)))
    what = f"shift {kind!r}"
    if modality == "MR":
        expect(kind != "metal", "shift", "a kind that exists in MR (metal is CT only)", kind)
        low, high = (float(v) for v in intensity_range)
        span = high - low
        head = head_region(image.astype(np.float32), (low, high))
        if kind == "bright":
            d = _diameter(rng, FLAIR_DIAMETER_RANGE_MM, head, spacing, IRREGULAR * 1.6, min_px, what)
            return insert_flair_lesion(image, spacing, rng, diameter_mm=d, intensity_range=(low, high),
                                       placement_mask=head)
        if kind == "hypo":
            d = _diameter(rng, FLAIR_DIAMETER_RANGE_MM, head, spacing, IRREGULAR, min_px, what)
            return insert_flair_cavity(image, spacing, rng, diameter_mm=d, intensity_range=(low, high),
                                       placement_mask=head)
        if kind == "texture":
            d = _diameter(rng, TEXTURE_DIAMETER_RANGE_MM, head, spacing, IRREGULAR, min_px, what)
            amplitude = float(rng.uniform(*TEXTURE_AMPLITUDE_RANGE)) * span
            return insert_texture(image, spacing, rng, amplitude=amplitude, diameter_mm=d, placement_mask=head,
                                  clip=(low, high))
        d = _diameter(rng, STAR_DIAMETER_RANGE_MM, head, spacing, 1.0, 0, what)
        contrast = float(rng.uniform(*STAR_CONTRAST_RANGE)) * span * float(rng.choice([-1.0, 1.0]))
        return insert_star(image, spacing, rng, contrast=contrast, diameter_mm=d, placement_mask=head)
    body = body_mask(image.astype(np.float32), BODY_LEVEL_HU, largest=False)
    if kind in ("bright", "hypo", "texture"):
        tissue = soft_tissue_mask_ct(image, spacing)
        size = TEXTURE_DIAMETER_RANGE_MM if kind == "texture" else CT_DIAMETER_RANGE_MM
        d = _diameter(rng, size, tissue, spacing, IRREGULAR, min_px, what + " in soft tissue")
        if kind == "texture":
            amplitude = float(rng.uniform(*TEXTURE_AMPLITUDE_RANGE_HU))
            return insert_texture(image, spacing, rng, amplitude=amplitude, diameter_mm=d, placement_mask=tissue)
        contrast = float(rng.uniform(*(CT_HYPERDENSE_RANGE_HU if kind == "bright" else CT_HYPODENSE_RANGE_HU)))
        return insert_ct_lesion(image, spacing, rng, diameter_mm=d, contrast_hu=contrast, placement_mask=tissue)
    if kind == "star":
        d = _diameter(rng, STAR_DIAMETER_RANGE_MM, body, spacing, 1.0, 0, what)
        contrast = float(rng.uniform(*STAR_CONTRAST_RANGE_HU)) * float(rng.choice([-1.0, 1.0]))
        return insert_star(image, spacing, rng, contrast=contrast, diameter_mm=d, placement_mask=body)
    d = _diameter(rng, (max(METAL_DIAMETER_RANGE_MM[0], 2.02 * max(spacing)), METAL_DIAMETER_RANGE_MM[1]), body,
                  spacing, 1.0, 0, what)
    return insert_metal(image, spacing, rng, diameter_mm=d, placement_mask=body)
