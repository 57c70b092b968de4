"""CT insertions (HU): liver-like hypo- / hyper-dense lesions, metal-like dense objects, and the
solid soft tissue a lesion may sit in."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from klip_med.data.lesions.geometry import (
    Inserted,
    check_image,
    check_number,
    check_rng,
    check_round_options,
    check_spacing,
    choose_diameter,
    finish,
    offsets_mm,
    place_centre,
    textured_round,
)
from klip_med.data.masks import BODY_LEVEL_HU, body_mask
from klip_med.errors import expect

CT_DIAMETER_RANGE_MM = (5.0, 30.0)
CT_CONTRAST_RANGE_HU = (10.0, 60.0)
METAL_DIAMETER_RANGE_MM = (3.0, 10.0)
METAL_DENSITY_RANGE_HU = (2000.0, 3000.0)
CT_SOFT_TISSUE_HU = (20.0, 180.0)
"""Smoothed-HU range of solid soft tissue (liver, spleen, kidney, muscle): above fat and water,
below contrast-filled vessels and bone."""
CT_SOFT_TISSUE_SMOOTH_MM = 3.0
"""Gaussian sigma (mm) applied before :data:`CT_SOFT_TISSUE_HU` is tested (ignores noise and texture)."""
CT_HYPODENSE_RANGE_HU = (-80.0, -40.0)
"""Signed contrast of a hypodense metastasis against enhanced parenchyma in the portal-venous phase."""
CT_HYPERDENSE_RANGE_HU = (40.0, 80.0)
"""Signed contrast of a hyperdense lesion (e.g. a hypervascular metastasis in the arterial phase),
the mirror of :data:`CT_HYPODENSE_RANGE_HU`."""



def soft_tissue_mask_ct(
    image: np.ndarray,
    pixel_spacing_mm: float | tuple[float, float],
    hu_range: tuple[float, float] = CT_SOFT_TISSUE_HU,
    smooth_mm: float = CT_SOFT_TISSUE_SMOOTH_MM,
) -> np.ndarray:
    """Solid soft tissue of a CT slice in HU, where a liver-like lesion can sit; bool (H, W).

    A pixel qualifies when the image, smoothed by a Gaussian of ``smooth_mm`` (sigma, mm), lies in
    ``hu_range`` (inclusive low, exclusive high). This keeps organ parenchyma and muscle and leaves
    out air, fat, fluid below ``hu_range[0]``, contrast-filled vessels and bone.
    """
    img = check_image(image)
    spacing = check_spacing(pixel_spacing_mm)
    smooth_mm = check_number("smooth_mm", smooth_mm, positive=True)
    ok = isinstance(hu_range, (tuple, list)) and len(hu_range) == 2 and float(hu_range[0]) < float(hu_range[1])
    expect(ok, "hu_range", "a (low, high) pair with low < high, in HU", hu_range)
    smooth = gaussian_filter(img.astype(np.float64), sigma=(smooth_mm / spacing[0], smooth_mm / spacing[1]))
    return (smooth >= float(hu_range[0])) & (smooth < float(hu_range[1]))



def insert_ct_lesion(
    image: np.ndarray,
    pixel_spacing_mm: float | tuple[float, float],
    rng: np.random.Generator,
    *,
    diameter_mm: float | None = None,
    contrast_hu: float | None = None,
    centre: tuple[float, float] | None = None,
    placement_mask: np.ndarray | None = None,
    edge_fraction: float = 0.15,
    texture: float = 0.2,
    texture_mm: float = 2.0,
    irregularity: float = 0.15,
) -> Inserted:
    """Insert a liver-like hypo- (contrast < 0) or hyper-dense (> 0) lesion into a CT slice in HU.

    Args:
        image: (H, W) in HU.
        pixel_spacing_mm: (row, col) spacing in mm, or one number.
        rng: the only source of randomness.
        diameter_mm: nominal diameter; None samples ``CT_DIAMETER_RANGE_MM`` (raised to 2 pixels).
        contrast_hu: signed mean change over the core in HU; None samples a magnitude in
            ``CT_CONTRAST_RANGE_HU`` with a random sign.
        centre: (row, col) in pixels; or else sampled inside ``placement_mask`` (e.g. a liver),
            or else inside the body (HU > -500), so the whole mask lies in that region.
        edge_fraction: sigmoid rim width as a fraction of the radius, in (0, 0.5].
        texture: relative std of the smoothed-noise texture inside the lesion, in [0, 0.5].
        texture_mm: correlation length of the texture in mm.
        irregularity: maximum relative deviation of the boundary radius from a circle, [0, 0.5].
    """
    img = check_image(image)
    spacing = check_spacing(pixel_spacing_mm)
    rng = check_rng(rng)
    edge_fraction, texture, texture_mm, irregularity = check_round_options(edge_fraction, texture, texture_mm,
                                                                           irregularity)
    diameter = choose_diameter(diameter_mm, rng, CT_DIAMETER_RANGE_MM, spacing, img.shape, 1 + irregularity)
    if contrast_hu is None:
        contrast = float(rng.uniform(*CT_CONTRAST_RANGE_HU) * rng.choice([-1.0, 1.0]))
    else:
        contrast = check_number("contrast_hu", contrast_hu)
        expect(contrast != 0, "contrast_hu", "a non-zero number (negative: hypo, positive: hyper)", contrast)
    return textured_round(
        img, spacing, rng, kind="ct_hypo" if contrast < 0 else "ct_hyper", diameter=diameter,
        contrast=contrast, centre=centre, placement_mask=placement_mask,
        default_region=lambda: body_mask(img, BODY_LEVEL_HU, largest=False),
        default_name="placement_mask (default: body, HU > -500)", edge_fraction=edge_fraction,
        texture=texture, texture_mm=texture_mm, irregularity=irregularity,
    )



def insert_metal(
    image: np.ndarray,
    pixel_spacing_mm: float | tuple[float, float],
    rng: np.random.Generator,
    *,
    density_hu: float | None = None,
    diameter_mm: float | None = None,
    aspect: float | None = None,
    centre: tuple[float, float] | None = None,
    placement_mask: np.ndarray | None = None,
) -> Inserted:
    """Insert a small very dense elliptical object (a metal-like streak source) into a CT slice in HU.

    Only the object is drawn: its pixels are blended towards ``density_hu`` with a partial-volume
    rim of a quarter pixel; the streaks are left to the CT physics. The mask covers the object.

    Args:
        density_hu: object value in HU; None samples ``METAL_DENSITY_RANGE_HU``.
        diameter_mm: long axis; None samples ``METAL_DIAMETER_RANGE_MM`` (raised to 2 pixels).
        aspect: long / short axis, >= 1, with the short axis >= 1 pixel; None samples [1, 3].
        centre, placement_mask: as for :func:`insert_ct_lesion`; default region: the body.
    """
    img = check_image(image)
    spacing = check_spacing(pixel_spacing_mm)
    rng = check_rng(rng)
    density = float(rng.uniform(*METAL_DENSITY_RANGE_HU)) if density_hu is None else check_number("density_hu", density_hu)
    diameter = choose_diameter(diameter_mm, rng, METAL_DIAMETER_RANGE_MM, spacing, img.shape, 1.0)
    widest = diameter / max(spacing)
    if aspect is None:
        aspect = float(rng.uniform(1.0, min(3.0, widest)))
    aspect = check_number("aspect", aspect)
    expect(1 <= aspect <= widest, "aspect", f"a ratio in [1, {widest:.3g}] (short axis >= 1 pixel)", aspect)
    angle = float(rng.uniform(0, np.pi))
    a, b = diameter / 2, diameter / 2 / aspect
    c = place_centre(rng, img.shape, spacing, a, centre, placement_mask,
               lambda: body_mask(img, BODY_LEVEL_HU, largest=False), "placement_mask (default: body, HU > -500)")
    dy, dx = offsets_mm(img.shape, c, spacing)
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    rho = np.hypot(u / a, v / b)
    edge = 0.25 * min(spacing)
    profile = expit((1 - rho) * b / edge)
    change = profile * (density - img.astype(np.float64))
    params = {"density_hu": density, "aspect": aspect, "angle_rad": angle, "edge_mm": edge}
    return finish(img, change, [profile], profile, "metal", c, diameter, spacing, params)
