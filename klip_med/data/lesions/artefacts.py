"""Artefacts of any modality: the KLIP paper's star (tapered bright or dark arms)."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

from klip_med.data.lesions.geometry import (
    CORE_LEVEL,
    Inserted,
    check_fraction,
    check_image,
    check_number,
    check_rng,
    check_spacing,
    choose_diameter,
    finish,
    offsets_mm,
    place_centre,
)
from klip_med.errors import expect

STAR_DIAMETER_RANGE_MM = (10.0, 40.0)
STAR_ARMS_RANGE = (4, 8)


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

