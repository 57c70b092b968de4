"""What every inserted lesion shares: its record (:class:`Lesion`, :class:`Inserted`), argument
checks, the soft round profile, placement inside a region, texture, and the bookkeeping that
turns profiles into an image, a half-maximum mask and a core contrast (see :mod:`klip_med.data.lesions`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.special import expit

from klip_med.errors import expect

SUPPORT = 1e-3
"""Profile level below which nothing is inserted (the image is left bit-identical there)."""
MASK_LEVEL = 0.5
"""Profile level of the mask boundary (half maximum)."""
CORE_LEVEL = 0.9
"""Fraction of the profile maximum that defines the core over which ``contrast`` is the mean."""


@dataclass(frozen=True)
class Lesion:
    """What was inserted, for benchmark logs.

    Attributes:
        kind: ``"ct_hypo"``, ``"ct_hyper"``, ``"flair"``, ``"flair_hypo"``, ``"texture"``, ``"star"`` or ``"metal"``.
        centre: (row, col) in pixels.
        diameter_mm: nominal diameter (round kinds: twice the mean boundary radius; star: twice
            the arm length; metal: the object's long axis).
        contrast: mean inserted change over the core, in image units (HU for CT), signed.
        pixel_spacing_mm: (row, col) spacing in mm.
        mask_pixels: number of True pixels in the mask.
        params: kind-specific numbers (amplitude, edge_mm, texture, arms, oedema, density_hu ...).
    """

    kind: str
    centre: tuple[float, float]
    diameter_mm: float
    contrast: float
    pixel_spacing_mm: tuple[float, float]
    mask_pixels: int
    params: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary."""
        return asdict(self)


class Inserted(NamedTuple):
    """Result of an insertion: new float32 (H, W) image, bool (H, W) mask, and its description."""

    image: np.ndarray
    mask: np.ndarray
    lesion: Lesion


# ----------------------------------------------------------------------------- validation


def check_image(image: object) -> np.ndarray:
    kind = type(image).__name__
    expect(isinstance(image, np.ndarray), "image", "a numpy.ndarray of shape (H, W) (use tensor.numpy())", kind)
    expect(image.ndim == 2, "image", "a 2D array of shape (H, W)", f"shape {tuple(image.shape)}")
    expect(min(image.shape) >= 4, "image", "at least 4 x 4 pixels", f"shape {tuple(image.shape)}")
    expect(
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating),
        "image", "a real integer or float array", f"dtype {image.dtype}",
    )
    out = image.astype(np.float32)  # always a copy
    bad = int(np.count_nonzero(~np.isfinite(out)))
    expect(bad == 0, "image", "finite values only", f"{bad} NaN/inf pixels")
    return out


def check_number(name: str, value: object, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    what = "a finite number > 0" if positive else "a finite number"
    expect(ok and math.isfinite(float(value)), name, what, value)
    expect(not positive or float(value) > 0, name, what, value)
    return float(value)


def check_fraction(name: str, value: object, low: float, high: float) -> float:
    v = check_number(name, value)
    expect(low <= v <= high, name, f"a number in [{low}, {high}]", value)
    return v


def check_spacing(spacing: object) -> tuple[float, float]:
    pair = (spacing, spacing) if np.ndim(spacing) == 0 else spacing
    expect(len(pair) == 2, "pixel_spacing_mm", "a number or a (row, col) pair in mm", spacing)
    return tuple(check_number("pixel_spacing_mm", v, positive=True) for v in pair)  # type: ignore[return-value]


def check_rng(rng: object) -> np.random.Generator:
    expect(isinstance(rng, np.random.Generator), "rng", "a numpy.random.Generator", type(rng).__name__)
    return rng  # type: ignore[return-value]


def check_mask(mask: object, shape: tuple[int, int], name: str = "placement_mask") -> np.ndarray:
    expect(isinstance(mask, np.ndarray), name, "a numpy bool array", type(mask).__name__)
    expect(mask.shape == shape, name, f"shape {shape} (the image's)", f"shape {mask.shape}")
    expect(mask.dtype == bool or np.issubdtype(mask.dtype, np.integer), name, "a bool array", mask.dtype)
    mask = mask.astype(bool)
    expect(bool(mask.any()), name, "at least one True pixel", "none")
    return mask


def check_round_options(edge_fraction: object, texture: object, texture_mm: object,
                        irregularity: object) -> tuple[float, float, float, float]:
    """The shape options of a round textured lesion, checked: rim width as a fraction of the radius
    in (0, 0.5], relative texture std in [0, 0.5], texture correlation length (mm) > 0, boundary
    irregularity in [0, 0.5]."""
    return (check_fraction("edge_fraction", edge_fraction, 1e-3, 0.5), check_fraction("texture", texture, 0.0, 0.5),
            check_number("texture_mm", texture_mm, positive=True),
            check_fraction("irregularity", irregularity, 0.0, 0.5))


def choose_diameter(
    value: object, rng: np.random.Generator, default: tuple[float, float], spacing: tuple[float, float],
    shape: tuple[int, int], spread: float,
) -> float:
    """Validate or sample a diameter: >= 2 pixels, and ``diameter * spread`` fits the image."""
    smallest = 2 * max(spacing)
    largest = min(shape[0] * spacing[0], shape[1] * spacing[1]) / spread
    if value is None:
        low, high = max(default[0], smallest), min(default[1], largest)
        expect(low <= high, "diameter_mm", f"a default range {default} mm that fits this image", f"[{low:.3g}, {high:.3g}]")
        return float(rng.uniform(low, high))
    d = check_number("diameter_mm", value, positive=True)
    expect(d >= smallest, "diameter_mm", f"at least 2 pixels (>= {smallest:.3g} mm)", d)
    expect(d <= largest, "diameter_mm", f"a lesion that fits the {shape[0]} x {shape[1]} image (<= {largest:.3g} mm)", d)
    return d


# ----------------------------------------------------------------------------- geometry


def offsets_mm(shape: tuple[int, int], centre: tuple[float, float], spacing: tuple[float, float]):
    rows = (np.arange(shape[0]) - centre[0]) * spacing[0]
    cols = (np.arange(shape[1]) - centre[1]) * spacing[1]
    return np.meshgrid(rows, cols, indexing="ij")


def boundary_harmonics(rng: np.random.Generator, irregularity: float) -> np.ndarray:
    """(3, 3) rows (order m, amplitude, phase) with sum of amplitudes <= irregularity."""
    orders = np.array([2.0, 3.0, 4.0])
    amplitudes = irregularity * rng.uniform(0.3, 1.0, 3) / 3
    phases = rng.uniform(0, 2 * np.pi, 3)
    return np.stack([orders, amplitudes, phases], axis=1)


def round_profile(dy, dx, radius_mm: float, harmonics: np.ndarray, edge_mm: float) -> np.ndarray:
    """Soft irregular disc: sigmoid((r(theta) - distance) / edge), 0.5 exactly on the boundary."""
    theta = np.arctan2(dy, dx)
    r = radius_mm * (1 + sum(a * np.cos(m * theta + p) for m, a, p in harmonics))
    return expit((r - np.hypot(dy, dx)) / edge_mm)



def inner_distance_mm(region: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """(H, W) distance (mm) of each pixel of ``region`` to the region's edge or the image border (0 outside)."""
    return distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1]


def largest_inscribed_radius_mm(region: np.ndarray, pixel_spacing_mm: float | tuple[float, float]) -> float:
    """Largest distance (mm) from a pixel of ``region`` to its edge or the image border; 0 if empty."""
    spacing = check_spacing(pixel_spacing_mm)
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return 0.0
    return float(inner_distance_mm(region, spacing).max())



def place_centre(
    rng: np.random.Generator, shape: tuple[int, int], spacing: tuple[float, float], reach_mm: float,
    centre: object, placement_mask: object, default_region, default_name: str,
) -> tuple[float, float]:
    """The centre: given (checked to keep ``reach_mm`` inside the image) or sampled uniformly
    among pixels farther than ``reach_mm`` from the region's edge and the image border."""
    expect(centre is None or placement_mask is None, "centre, placement_mask", "at most one of them", "both")
    if centre is not None:
        ok = isinstance(centre, (tuple, list, np.ndarray)) and len(centre) == 2
        expect(ok, "centre", "a (row, col) pair in pixels", centre)
        c = tuple(check_number("centre", v) for v in centre)
        for axis in (0, 1):
            half = reach_mm / spacing[axis]
            inside = c[axis] - half >= -0.5 and c[axis] + half <= shape[axis] - 0.5
            expect(inside, "centre", f"a point >= {reach_mm:.3g} mm from the image border (lesion extent)", c)
        return c  # type: ignore[return-value]
    if placement_mask is None:
        region, name = default_region(), default_name
        expect(bool(region.any()), name, "at least one True pixel", "none (pass centre or placement_mask)")
    else:
        region, name = check_mask(placement_mask, shape), "placement_mask"
    distance = inner_distance_mm(region, spacing)
    rows, cols = np.nonzero(distance > reach_mm)
    expect(
        rows.size > 0, name,
        f"a point > {reach_mm:.3g} mm inside its edge and the image border (to hold the lesion)",
        f"at most {distance.max():.3g} mm",
    )
    k = int(rng.integers(rows.size))
    return float(rows[k]), float(cols[k])


def smooth_texture(rng, shape, spacing, texture_mm, core, mask) -> np.ndarray:
    """Smoothed Gaussian noise: zero mean over the core, unit std over the mask, clipped to +-3."""
    g = gaussian_filter(rng.standard_normal(shape), sigma=(texture_mm / spacing[0], texture_mm / spacing[1]))
    g -= g[core].mean()
    std = g[mask].std()
    return np.clip(g / std, -3, 3) if std > 0 else np.zeros(shape)


def finish(image, change, profiles, main, kind, centre, diameter, spacing, params, clip=None) -> Inserted:
    """Scale-free bookkeeping shared by all kinds: support, mask, core contrast, output."""
    support = np.maximum.reduce(profiles) >= SUPPORT
    change = np.where(support, change, 0.0)
    mask = np.logical_or.reduce([p >= MASK_LEVEL for p in profiles])
    expect(bool(mask.any()), "diameter_mm", "a lesion large enough to cover a pixel", diameter)
    core = main >= CORE_LEVEL * main.max()
    out = image.astype(np.float64) + change
    out = np.where(support, out, image)
    if clip is not None:
        out = np.clip(out, *clip)
    contrast = float(params.pop("contrast", change[core].mean()))
    params = {k: v if isinstance(v, int) else float(v) for k, v in params.items()}
    lesion = Lesion(kind, (float(centre[0]), float(centre[1])), float(diameter), contrast,
                    spacing, int(mask.sum()), params)
    return Inserted(out.astype(np.float32), mask, lesion)


def textured_round(image, spacing, rng, *, kind, diameter, contrast, centre, placement_mask, default_region,
                    default_name, edge_fraction, texture, texture_mm, irregularity, oedema=0.0,
                    oedema_extent=0.0, clip=None) -> Inserted:
    shape = image.shape
    radius = diameter / 2
    harmonics = boundary_harmonics(rng, irregularity)
    outer = radius * (1 + oedema_extent) if oedema > 0 else radius
    oedema_harmonics = boundary_harmonics(rng, irregularity)
    c = place_centre(rng, shape, spacing, outer * (1 + irregularity), centre, placement_mask, default_region, default_name)
    dy, dx = offsets_mm(shape, c, spacing)
    edge = edge_fraction * radius
    p = round_profile(dy, dx, radius, harmonics, edge)
    profiles = [p]
    core = p >= CORE_LEVEL * p.max()
    g = smooth_texture(rng, shape, spacing, texture_mm, core, p >= MASK_LEVEL)
    field_ = p * np.clip(1 + texture * g, 0, None)
    params = {"edge_mm": edge, "texture": texture, "texture_mm": texture_mm, "irregularity": irregularity}
    if oedema > 0:
        p_o = round_profile(dy, dx, outer, oedema_harmonics, edge_fraction * outer)
        field_ = field_ + oedema * p_o * (1 - p)
        profiles.append(p_o)
        params.update(oedema=oedema, oedema_diameter_mm=2 * outer)
    amplitude = contrast / field_[core].mean()
    params.update(amplitude=amplitude, contrast=contrast)
    return finish(image, amplitude * field_, profiles, p, kind, c, diameter, spacing, params, clip)

