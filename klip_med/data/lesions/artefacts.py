"""Shifts of any modality: the KLIP paper's star (tapered bright or dark arms) and an iso-intense
texture change (same mean, different texture)."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from klip_med.data.lesions.geometry import (
    CORE_LEVEL,
    MASK_LEVEL,
    Inserted,
    boundary_harmonics,
    check_fraction,
    check_image,
    check_number,
    check_rng,
    check_spacing,
    choose_diameter,
    finish,
    offsets_mm,
    place_centre,
    round_profile,
)
from klip_med.errors import expect

STAR_DIAMETER_RANGE_MM = (10.0, 40.0)
STAR_ARMS_RANGE = (4, 8)
STAR_CONTRAST_RANGE = (0.15, 0.4)
"""Magnitude of an MR star's contrast as a fraction of the intensity range (sign drawn at random)."""
STAR_CONTRAST_RANGE_HU = (100.0, 300.0)
"""Magnitude of a CT star's contrast in HU (sign drawn at random)."""
TEXTURE_DIAMETER_RANGE_MM = (10.0, 30.0)
TEXTURE_AMPLITUDE_RANGE = (0.08, 0.15)
"""Std of an MR texture change inside its mask, as a fraction of the intensity range."""
TEXTURE_AMPLITUDE_RANGE_HU = (25.0, 50.0)
"""Std of a CT texture change inside its mask, in HU."""


def insert_star(
    image: np.ndarray,
    pixel_spacing_mm: float | tuple[float, float],
    rng: np.random.Generator,
    *,
    contrast: float,
    arms: int | None = None,
    diameter_mm: float | None = None,
    centre: tuple[float, float] | None = None,
    placement_mask: np.ndarray | None = None,
    arm_width: float = 0.5,
    edge_fraction: float = 0.15,
) -> Inserted:
    """Insert a bright (contrast > 0) or dark (< 0) star artefact with ``arms`` tapered arms.

    Each arm is a triangle from the centre to a tip at radius diameter/2, half-width at the centre
    ``arm_width * radius * sin(pi / arms)``, with a sigmoid rim of ``edge_fraction`` times that
    half-width. Any modality: ``contrast`` is in image units (mean change over the core).

    Args:
        arms: number of arms, >= 2; None samples ``STAR_ARMS_RANGE``.
        diameter_mm: tip-to-tip span (2 * arm length); None samples ``STAR_DIAMETER_RANGE_MM``.
        centre, placement_mask: as for :func:`insert_ct_lesion`; default region: the whole image.
        arm_width: in (0, 1].
    """
    img = check_image(image)
    spacing = check_spacing(pixel_spacing_mm)
    rng = check_rng(rng)
    value = check_number("contrast", contrast)
    expect(value != 0, "contrast", "a non-zero number (positive: bright star, negative: dark)", value)
    if arms is None:
        arms = int(rng.integers(STAR_ARMS_RANGE[0], STAR_ARMS_RANGE[1] + 1))
    ok = isinstance(arms, (int, np.integer)) and not isinstance(arms, bool) and 2 <= arms <= 64
    expect(ok, "arms", "an integer in [2, 64]", arms)
    arm_width = check_fraction("arm_width", arm_width, 1e-3, 1.0)
    edge_fraction = check_fraction("edge_fraction", edge_fraction, 1e-3, 0.5)
    diameter = choose_diameter(diameter_mm, rng, STAR_DIAMETER_RANGE_MM, spacing, img.shape, 1.0)
    rotation = float(rng.uniform(0, 2 * np.pi / arms))
    radius = diameter / 2
    c = place_centre(rng, img.shape, spacing, radius, centre, placement_mask,
               lambda: np.ones(img.shape, bool), "placement_mask (default: whole image)")
    dy, dx = offsets_mm(img.shape, c, spacing)
    half_width = arm_width * radius * math.sin(math.pi / arms)
    edge = edge_fraction * half_width
    profile = np.zeros(img.shape)
    for j in range(arms):
        phi = rotation + 2 * np.pi * j / arms
        along = dx * math.cos(phi) + dy * math.sin(phi)
        across = np.abs(-dx * math.sin(phi) + dy * math.cos(phi))
        width = half_width * (1 - np.clip(along, 0, radius) / radius)
        beyond = np.where(along < 0, -along, np.where(along > radius, along - radius, 0.0))
        profile = np.maximum(profile, expit((width - np.hypot(across, beyond)) / edge))
    core = profile >= CORE_LEVEL * profile.max()
    amplitude = value / profile[core].mean()
    params = {"arms": int(arms), "rotation_rad": rotation, "arm_width": arm_width, "edge_mm": edge,
              "amplitude": amplitude, "contrast": value}
    return finish(img, amplitude * profile, [profile], profile, "star", c, diameter, spacing, params)



def insert_texture(
    image: np.ndarray,
    pixel_spacing_mm: float | tuple[float, float],
    rng: np.random.Generator,
    *,
    amplitude: float,
    texture_mm: float | None = None,
    diameter_mm: float | None = None,
    centre: tuple[float, float] | None = None,
    placement_mask: np.ndarray | None = None,
    edge_fraction: float = 0.15,
    irregularity: float = 0.15,
    clip: tuple[float, float] | None = None,
) -> Inserted:
    """Insert an iso-intense texture change (kind ``texture``): inside a soft irregular disc, add a
    zero-mean smoothed-noise pattern, ``change = amplitude * P * g``.

    ``g`` is Gaussian noise smoothed by a Gaussian of sigma ``texture_mm``, shifted so that the
    change sums to exactly zero over the mask (the mean inside the lesion is unchanged) and scaled
    so that its std over the mask is ``amplitude``; only the texture differs. Clipping (``clip``)
    can move the mean where the pattern reaches the limits: ``params["mean_change_in_mask"]`` is
    measured after it.

    Args:
        amplitude: std of the change over the mask, image units (> 0).
        texture_mm: correlation length; None: one pixel (the largest spacing).
        diameter_mm: None samples :data:`TEXTURE_DIAMETER_RANGE_MM`.
        centre, placement_mask: as for :func:`insert_star` (default region: the whole image).
        clip: (low, high) the output is clipped to, or None.
    """
    img = check_image(image)
    spacing = check_spacing(pixel_spacing_mm)
    rng = check_rng(rng)
    amplitude = check_number("amplitude", amplitude, positive=True)
    texture_mm = max(spacing) if texture_mm is None else check_number("texture_mm", texture_mm, positive=True)
    edge_fraction = check_fraction("edge_fraction", edge_fraction, 1e-3, 0.5)
    irregularity = check_fraction("irregularity", irregularity, 0.0, 0.5)
    diameter = choose_diameter(diameter_mm, rng, TEXTURE_DIAMETER_RANGE_MM, spacing, img.shape, 1 + irregularity)
    radius = diameter / 2
    harmonics = boundary_harmonics(rng, irregularity)
    c = place_centre(rng, img.shape, spacing, radius * (1 + irregularity), centre, placement_mask,
                     lambda: np.ones(img.shape, bool), "placement_mask (default: whole image)")
    dy, dx = offsets_mm(img.shape, c, spacing)
    p = round_profile(dy, dx, radius, harmonics, edge_fraction * radius)
    mask = p >= MASK_LEVEL
    g = gaussian_filter(rng.standard_normal(img.shape), sigma=(texture_mm / spacing[0], texture_mm / spacing[1]))
    g -= (p * g)[mask].sum() / p[mask].sum()
    g /= (p * g)[mask].std()
    change = amplitude * p * g
    out = finish(img, change, [p], p, "texture", c, diameter, spacing,
                 {"amplitude": amplitude, "texture_mm": texture_mm, "edge_mm": edge_fraction * radius,
                  "irregularity": irregularity}, clip)
    measured = out.image.astype(np.float64)[mask] - img.astype(np.float64)[mask]
    out.lesion.params.update(mean_change_in_mask=float(measured.mean()), std_change_in_mask=float(measured.std()))
    return out
