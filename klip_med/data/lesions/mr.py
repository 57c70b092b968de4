"""MR insertions: FLAIR-hyperintense lesions (bright core, soft rim, optional oedema ring) and
FLAIR-hypointense, CSF-like cavities (a resection cavity: FLAIR suppresses fluid)."""

from __future__ import annotations

import numpy as np

from klip_med.data.lesions.geometry import (
    CORE_LEVEL,
    MASK_LEVEL,
    Inserted,
    boundary_harmonics,
    check_fraction,
    check_image,
    check_number,
    check_rng,
    check_round_options,
    check_spacing,
    choose_diameter,
    finish,
    offsets_mm,
    place_centre,
    round_profile,
    smooth_texture,
    textured_round,
)
from klip_med.data.masks import MR_BODY_FRACTION, body_mask
from klip_med.errors import expect

FLAIR_DIAMETER_RANGE_MM = (5.0, 30.0)
FLAIR_CONTRAST_RANGE = (0.15, 0.4)
"""FLAIR contrast range as a fraction of the intensity range."""
FLAIR_CAVITY_LEVEL_RANGE = (0.02, 0.08)
"""Value of a CSF-like cavity as a fraction of the intensity range (fluid is nulled in FLAIR: darker
than any brain tissue)."""


def _check_range(image: np.ndarray, intensity_range) -> tuple[float, float]:
    ok = isinstance(intensity_range, (tuple, list)) and len(intensity_range) == 2
    expect(ok, "intensity_range", "a (low, high) pair", intensity_range)
    low, high = (check_number("intensity_range", v) for v in intensity_range)
    expect(low < high, "intensity_range", "low < high", intensity_range)
    span = high - low
    lo_img, hi_img = float(image.min()), float(image.max())
    inside = lo_img >= low - 1e-3 * span and hi_img <= high + 1e-3 * span
    expect(inside, "image", f"values inside intensity_range [{low:g}, {high:g}]", f"[{lo_img:.4g}, {hi_img:.4g}]")
    return low, high


def head_region(image: np.ndarray, intensity_range: tuple[float, float]) -> np.ndarray:
    """Where an MR insertion is placed by default: the head (values above 10 % of the range, holes filled)."""
    low, high = intensity_range
    return body_mask(image, low + MR_BODY_FRACTION * (high - low), largest=False)


def insert_flair_lesion(
    image: np.ndarray,
    pixel_spacing_mm: float | tuple[float, float],
    rng: np.random.Generator,
    *,
    intensity_range: tuple[float, float] = (0.0, 1.0),
    diameter_mm: float | None = None,
    contrast: float | None = None,
    oedema: float = 0.3,
    oedema_extent: float = 0.6,
    centre: tuple[float, float] | None = None,
    placement_mask: np.ndarray | None = None,
    edge_fraction: float = 0.15,
    texture: float = 0.15,
    texture_mm: float = 2.0,
    irregularity: float = 0.15,
) -> Inserted:
    """Insert a FLAIR-hyperintense lesion (bright core, soft rim, optional oedema ring) into an MR slice.

    Args:
        image: (H, W) with values inside ``intensity_range`` (e.g. (0, 1) or (0, 255)).
        intensity_range: (low, high); the output is clipped to it.
        diameter_mm: nominal core diameter; None samples ``FLAIR_DIAMETER_RANGE_MM``.
        contrast: mean change over the core (> 0), image units; None samples
            ``FLAIR_CONTRAST_RANGE`` times the range width.
        oedema: oedema brightness as a fraction of the core amplitude, in [0, 1); 0 disables it.
        oedema_extent: oedema radius = core radius * (1 + oedema_extent), in (0, 3].
        centre, placement_mask: as for :func:`insert_ct_lesion`; default region: the head
            (values above 10 % of the range, holes filled).
        Other arguments as for :func:`insert_ct_lesion`.
    """
    img = check_image(image)
    spacing = check_spacing(pixel_spacing_mm)
    rng = check_rng(rng)
    low, high = _check_range(img, intensity_range)
    span = high - low
    oedema = check_fraction("oedema", oedema, 0.0, 0.99)
    oedema_extent = check_fraction("oedema_extent", oedema_extent, 1e-3, 3.0)
    edge_fraction, texture, texture_mm, irregularity = check_round_options(edge_fraction, texture, texture_mm,
                                                                           irregularity)
    spread = (1 + irregularity) * ((1 + oedema_extent) if oedema > 0 else 1)
    diameter = choose_diameter(diameter_mm, rng, FLAIR_DIAMETER_RANGE_MM, spacing, img.shape, spread)
    if contrast is None:
        value = float(rng.uniform(*FLAIR_CONTRAST_RANGE) * span)
    else:
        value = check_number("contrast", contrast, positive=True)
    return textured_round(
        img, spacing, rng, kind="flair", diameter=diameter, contrast=value, centre=centre,
        placement_mask=placement_mask,
        default_region=lambda: head_region(img, (low, high)),
        default_name="placement_mask (default: head, > 10 % of intensity_range)",
        edge_fraction=edge_fraction, texture=texture, texture_mm=texture_mm, irregularity=irregularity,
        oedema=oedema, oedema_extent=oedema_extent, clip=(low, high),
    )



def insert_flair_cavity(
    image: np.ndarray,
    pixel_spacing_mm: float | tuple[float, float],
    rng: np.random.Generator,
    *,
    intensity_range: tuple[float, float] = (0.0, 1.0),
    level: float | None = None,
    diameter_mm: float | None = None,
    centre: tuple[float, float] | None = None,
    placement_mask: np.ndarray | None = None,
    edge_fraction: float = 0.15,
    texture: float = 0.3,
    texture_mm: float = 2.0,
    irregularity: float = 0.15,
) -> Inserted:
    """Insert a FLAIR-hypointense, CSF-like cavity (kind ``flair_hypo``): the tissue is replaced by
    fluid, the image pulled to ``low + level * (high - low)`` with the soft round profile P:
    ``out = in + P (target - in)`` with ``target = low + span * level * (1 + texture * g)`` (g: smooth
    unit-std noise; fluid is nearly flat, so the texture is relative to the low level).

    Args:
        level: the fluid's value as a fraction of the range, in [0, 0.5]; None samples
            :data:`FLAIR_CAVITY_LEVEL_RANGE`.
        texture: relative std of the fluid's value, in [0, 0.5].
        Other arguments as for :func:`insert_flair_lesion` (default region: the head).

    The recorded ``contrast`` is the measured mean change over the core (negative wherever the
    tissue was brighter than fluid).
    """
    img = check_image(image)
    spacing = check_spacing(pixel_spacing_mm)
    rng = check_rng(rng)
    low, high = _check_range(img, intensity_range)
    span = high - low
    edge_fraction, texture, texture_mm, irregularity = check_round_options(edge_fraction, texture, texture_mm,
                                                                           irregularity)
    value = float(rng.uniform(*FLAIR_CAVITY_LEVEL_RANGE)) if level is None else check_fraction("level", level, 0.0, 0.5)
    diameter = choose_diameter(diameter_mm, rng, FLAIR_DIAMETER_RANGE_MM, spacing, img.shape, 1 + irregularity)
    radius = diameter / 2
    harmonics = boundary_harmonics(rng, irregularity)
    c = place_centre(rng, img.shape, spacing, radius * (1 + irregularity), centre, placement_mask,
                     lambda: head_region(img, (low, high)), "placement_mask (default: head, > 10 % of intensity_range)")
    dy, dx = offsets_mm(img.shape, c, spacing)
    p = round_profile(dy, dx, radius, harmonics, edge_fraction * radius)
    g = smooth_texture(rng, img.shape, spacing, texture_mm, p >= CORE_LEVEL * p.max(), p >= MASK_LEVEL)
    target = low + span * value * (1 + texture * g)
    params = {"level": value, "target": low + span * value, "edge_mm": edge_fraction * radius, "texture": texture,
              "texture_mm": texture_mm, "irregularity": irregularity}
    return finish(img, p * (target - img.astype(np.float64)), [p], p, "flair_hypo", c, diameter, spacing, params,
                  clip=(low, high))
