"""Synthetic lesions with exact ground-truth masks, inserted into real 2D slices.

Arrays: an image is a numpy array of shape (H, W) (torch tensors are refused: pass
``tensor.numpy()``). It is read as float32 and never modified; every function returns a new
float32 image. Pixel (row, col) has its centre at (row, col). ``pixel_spacing_mm`` is the
(row, column) spacing in mm, or one number for square pixels. All randomness comes from the
``numpy.random.Generator`` passed in: the same generator state and arguments give the same lesion.

Mask definition (the ground truth AUROCs are computed against)
    Each insertion is built from noiseless *profiles* P in [0, 1]: the shape with its soft sigmoid
    rim, before texture. The mask is the union over components of ``P >= 0.5``, the half-maximum
    contour. For round lesions that is exactly the pixels within the boundary radius r(theta) of
    the centre, so its area is pi * diameter**2 / 4 up to the irregularity (+<= 1 %) and pixel
    discretisation. Texture never enters the mask. A FLAIR lesion's oedema ring is a component
    (the mask is lesion + oedema, like the FLAIR "whole tumour"); a star's mask is its arms; a
    metal source's mask is the object.

Contrast
    ``contrast`` is the mean inserted change (output - input) over the lesion *core*: the pixels
    where the main profile is >= 0.9 of its maximum. The amplitude is scaled so that this holds
    exactly (FLAIR: before clipping to ``intensity_range``). Metal replaces the pixel values, so
    its ``contrast`` is measured and the requested density is ``params['density_hu']``.

Outside the mask (the soft-edge tolerance)
    The change is at most ``|amplitude| * (1 + 3 * texture) * P`` with P < 0.5, falling off like
    ``exp(-distance_beyond_boundary / edge_mm)``; wherever every profile is below
    ``SUPPORT = 1e-3`` the output equals the input (as float32) bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.ndimage import binary_fill_holes, distance_transform_edt, gaussian_filter
from scipy.special import expit

from klip_med.errors import expect

SUPPORT = 1e-3
"""Profile level below which nothing is inserted (the image is left bit-identical there)."""
MASK_LEVEL = 0.5
"""Profile level of the mask boundary (half maximum)."""
CORE_LEVEL = 0.9
"""Fraction of the profile maximum that defines the core over which ``contrast`` is the mean."""
CT_DIAMETER_RANGE_MM = (5.0, 30.0)
CT_CONTRAST_RANGE_HU = (10.0, 60.0)
FLAIR_DIAMETER_RANGE_MM = (5.0, 30.0)
FLAIR_CONTRAST_RANGE = (0.15, 0.4)
"""FLAIR contrast range as a fraction of the intensity range."""
STAR_DIAMETER_RANGE_MM = (10.0, 40.0)
STAR_ARMS_RANGE = (4, 8)
METAL_DIAMETER_RANGE_MM = (3.0, 10.0)
METAL_DENSITY_RANGE_HU = (2000.0, 3000.0)
BODY_THRESHOLD_HU = -500.0
CT_SOFT_TISSUE_HU = (20.0, 180.0)
"""Smoothed-HU range of solid soft tissue (liver, spleen, kidney, muscle): above fat and water,
below contrast-filled vessels and bone."""
CT_SOFT_TISSUE_SMOOTH_MM = 3.0
"""Gaussian sigma (mm) applied before :data:`CT_SOFT_TISSUE_HU` is tested (ignores noise and texture)."""
CT_HYPODENSE_RANGE_HU = (-80.0, -40.0)
"""Signed contrast of a hypodense metastasis against enhanced parenchyma in the portal-venous phase."""


@dataclass(frozen=True)
class Lesion:
    """What was inserted, for benchmark logs.

    Attributes:
        kind: ``"ct_hypo"``, ``"ct_hyper"``, ``"flair"``, ``"star"`` or ``"metal"``.
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


def _check_image(image: object) -> np.ndarray:
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


def _check_number(name: str, value: object, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    what = "a finite number > 0" if positive else "a finite number"
    expect(ok and math.isfinite(float(value)), name, what, value)
    expect(not positive or float(value) > 0, name, what, value)
    return float(value)


def _check_fraction(name: str, value: object, low: float, high: float) -> float:
    v = _check_number(name, value)
    expect(low <= v <= high, name, f"a number in [{low}, {high}]", value)
    return v


def _check_spacing(spacing: object) -> tuple[float, float]:
    pair = (spacing, spacing) if np.ndim(spacing) == 0 else spacing
    expect(len(pair) == 2, "pixel_spacing_mm", "a number or a (row, col) pair in mm", spacing)
    return tuple(_check_number("pixel_spacing_mm", v, positive=True) for v in pair)  # type: ignore[return-value]


def _check_rng(rng: object) -> np.random.Generator:
    expect(isinstance(rng, np.random.Generator), "rng", "a numpy.random.Generator", type(rng).__name__)
    return rng  # type: ignore[return-value]


def _check_mask(mask: object, shape: tuple[int, int], name: str = "placement_mask") -> np.ndarray:
    expect(isinstance(mask, np.ndarray), name, "a numpy bool array", type(mask).__name__)
    expect(mask.shape == shape, name, f"shape {shape} (the image's)", f"shape {mask.shape}")
    expect(mask.dtype == bool or np.issubdtype(mask.dtype, np.integer), name, "a bool array", mask.dtype)
    mask = mask.astype(bool)
    expect(bool(mask.any()), name, "at least one True pixel", "none")
    return mask


def _diameter(
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
    d = _check_number("diameter_mm", value, positive=True)
    expect(d >= smallest, "diameter_mm", f"at least 2 pixels (>= {smallest:.3g} mm)", d)
    expect(d <= largest, "diameter_mm", f"a lesion that fits the {shape[0]} x {shape[1]} image (<= {largest:.3g} mm)", d)
    return d


# ----------------------------------------------------------------------------- geometry


def _offsets_mm(shape: tuple[int, int], centre: tuple[float, float], spacing: tuple[float, float]):
    rows = (np.arange(shape[0]) - centre[0]) * spacing[0]
    cols = (np.arange(shape[1]) - centre[1]) * spacing[1]
    return np.meshgrid(rows, cols, indexing="ij")


def _harmonics(rng: np.random.Generator, irregularity: float) -> np.ndarray:
    """(3, 3) rows (order m, amplitude, phase) with sum of amplitudes <= irregularity."""
    orders = np.array([2.0, 3.0, 4.0])
    amplitudes = irregularity * rng.uniform(0.3, 1.0, 3) / 3
    phases = rng.uniform(0, 2 * np.pi, 3)
    return np.stack([orders, amplitudes, phases], axis=1)


def _round_profile(dy, dx, radius_mm: float, harmonics: np.ndarray, edge_mm: float) -> np.ndarray:
    """Soft irregular disc: sigmoid((r(theta) - distance) / edge), 0.5 exactly on the boundary."""
    theta = np.arctan2(dy, dx)
    r = radius_mm * (1 + sum(a * np.cos(m * theta + p) for m, a, p in harmonics))
    return expit((r - np.hypot(dy, dx)) / edge_mm)


def body_mask_ct(image: np.ndarray) -> np.ndarray:
    """Body of a CT slice in HU: ``image > -500`` with holes (lungs, gas) filled; bool (H, W)."""
    return binary_fill_holes(_check_image(image) > BODY_THRESHOLD_HU)


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
    img = _check_image(image)
    spacing = _check_spacing(pixel_spacing_mm)
    smooth_mm = _check_number("smooth_mm", smooth_mm, positive=True)
    ok = isinstance(hu_range, (tuple, list)) and len(hu_range) == 2 and float(hu_range[0]) < float(hu_range[1])
    expect(ok, "hu_range", "a (low, high) pair with low < high, in HU", hu_range)
    smooth = gaussian_filter(img.astype(np.float64), sigma=(smooth_mm / spacing[0], smooth_mm / spacing[1]))
    return (smooth >= float(hu_range[0])) & (smooth < float(hu_range[1]))


def _inner_distance_mm(region: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """(H, W) distance (mm) of each pixel of ``region`` to the region's edge or the image border (0 outside)."""
    return distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1]


def largest_inscribed_radius_mm(region: np.ndarray, pixel_spacing_mm: float | tuple[float, float]) -> float:
    """Largest distance (mm) from a pixel of ``region`` to its edge or the image border; 0 if empty."""
    spacing = _check_spacing(pixel_spacing_mm)
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return 0.0
    return float(_inner_distance_mm(region, spacing).max())


def body_mask_mr(image: np.ndarray, intensity_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Head/body of an MR slice: above 10 % of the intensity range, holes filled; bool (H, W)."""
    low, high = intensity_range
    return binary_fill_holes(_check_image(image) > low + 0.1 * (high - low))


def _place(
    rng: np.random.Generator, shape: tuple[int, int], spacing: tuple[float, float], reach_mm: float,
    centre: object, placement_mask: object, default_region, default_name: str,
) -> tuple[float, float]:
    """The centre: given (checked to keep ``reach_mm`` inside the image) or sampled uniformly
    among pixels farther than ``reach_mm`` from the region's edge and the image border."""
    expect(centre is None or placement_mask is None, "centre, placement_mask", "at most one of them", "both")
    if centre is not None:
        ok = isinstance(centre, (tuple, list, np.ndarray)) and len(centre) == 2
        expect(ok, "centre", "a (row, col) pair in pixels", centre)
        c = tuple(_check_number("centre", v) for v in centre)
        for axis in (0, 1):
            half = reach_mm / spacing[axis]
            inside = c[axis] - half >= -0.5 and c[axis] + half <= shape[axis] - 0.5
            expect(inside, "centre", f"a point >= {reach_mm:.3g} mm from the image border (lesion extent)", c)
        return c  # type: ignore[return-value]
    if placement_mask is None:
        region, name = default_region(), default_name
        expect(bool(region.any()), name, "at least one True pixel", "none (pass centre or placement_mask)")
    else:
        region, name = _check_mask(placement_mask, shape), "placement_mask"
    distance = _inner_distance_mm(region, spacing)
    rows, cols = np.nonzero(distance > reach_mm)
    expect(
        rows.size > 0, name,
        f"a point > {reach_mm:.3g} mm inside its edge and the image border (to hold the lesion)",
        f"at most {distance.max():.3g} mm",
    )
    k = int(rng.integers(rows.size))
    return float(rows[k]), float(cols[k])


def _texture(rng, shape, spacing, texture_mm, core, mask) -> np.ndarray:
    """Smoothed Gaussian noise: zero mean over the core, unit std over the mask, clipped to +-3."""
    g = gaussian_filter(rng.standard_normal(shape), sigma=(texture_mm / spacing[0], texture_mm / spacing[1]))
    g -= g[core].mean()
    std = g[mask].std()
    return np.clip(g / std, -3, 3) if std > 0 else np.zeros(shape)


def _finish(image, change, profiles, main, kind, centre, diameter, spacing, params, clip=None) -> Inserted:
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


def _textured_round(image, spacing, rng, *, kind, diameter, contrast, centre, placement_mask, default_region,
                    default_name, edge_fraction, texture, texture_mm, irregularity, oedema=0.0,
                    oedema_extent=0.0, clip=None) -> Inserted:
    shape = image.shape
    radius = diameter / 2
    harmonics = _harmonics(rng, irregularity)
    outer = radius * (1 + oedema_extent) if oedema > 0 else radius
    oedema_harmonics = _harmonics(rng, irregularity)
    c = _place(rng, shape, spacing, outer * (1 + irregularity), centre, placement_mask, default_region, default_name)
    dy, dx = _offsets_mm(shape, c, spacing)
    edge = edge_fraction * radius
    p = _round_profile(dy, dx, radius, harmonics, edge)
    profiles = [p]
    core = p >= CORE_LEVEL * p.max()
    g = _texture(rng, shape, spacing, texture_mm, core, p >= MASK_LEVEL)
    field_ = p * np.clip(1 + texture * g, 0, None)
    params = {"edge_mm": edge, "texture": texture, "texture_mm": texture_mm, "irregularity": irregularity}
    if oedema > 0:
        p_o = _round_profile(dy, dx, outer, oedema_harmonics, edge_fraction * outer)
        field_ = field_ + oedema * p_o * (1 - p)
        profiles.append(p_o)
        params.update(oedema=oedema, oedema_diameter_mm=2 * outer)
    amplitude = contrast / field_[core].mean()
    params.update(amplitude=amplitude, contrast=contrast)
    return _finish(image, amplitude * field_, profiles, p, kind, c, diameter, spacing, params, clip)


# ----------------------------------------------------------------------------- public API


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
    img = _check_image(image)
    spacing = _check_spacing(pixel_spacing_mm)
    rng = _check_rng(rng)
    edge_fraction = _check_fraction("edge_fraction", edge_fraction, 1e-3, 0.5)
    texture = _check_fraction("texture", texture, 0.0, 0.5)
    texture_mm = _check_number("texture_mm", texture_mm, positive=True)
    irregularity = _check_fraction("irregularity", irregularity, 0.0, 0.5)
    diameter = _diameter(diameter_mm, rng, CT_DIAMETER_RANGE_MM, spacing, img.shape, 1 + irregularity)
    if contrast_hu is None:
        contrast = float(rng.uniform(*CT_CONTRAST_RANGE_HU) * rng.choice([-1.0, 1.0]))
    else:
        contrast = _check_number("contrast_hu", contrast_hu)
        expect(contrast != 0, "contrast_hu", "a non-zero number (negative: hypo, positive: hyper)", contrast)
    return _textured_round(
        img, spacing, rng, kind="ct_hypo" if contrast < 0 else "ct_hyper", diameter=diameter,
        contrast=contrast, centre=centre, placement_mask=placement_mask,
        default_region=lambda: body_mask_ct(img),
        default_name="placement_mask (default: body, HU > -500)", edge_fraction=edge_fraction,
        texture=texture, texture_mm=texture_mm, irregularity=irregularity,
    )


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
    img = _check_image(image)
    spacing = _check_spacing(pixel_spacing_mm)
    rng = _check_rng(rng)
    ok = isinstance(intensity_range, (tuple, list)) and len(intensity_range) == 2
    expect(ok, "intensity_range", "a (low, high) pair", intensity_range)
    low, high = (_check_number("intensity_range", v) for v in intensity_range)
    expect(low < high, "intensity_range", "low < high", intensity_range)
    span = high - low
    lo_img, hi_img = float(img.min()), float(img.max())
    inside = lo_img >= low - 1e-3 * span and hi_img <= high + 1e-3 * span
    expect(inside, "image", f"values inside intensity_range [{low:g}, {high:g}]", f"[{lo_img:.4g}, {hi_img:.4g}]")
    oedema = _check_fraction("oedema", oedema, 0.0, 0.99)
    oedema_extent = _check_fraction("oedema_extent", oedema_extent, 1e-3, 3.0)
    edge_fraction = _check_fraction("edge_fraction", edge_fraction, 1e-3, 0.5)
    texture = _check_fraction("texture", texture, 0.0, 0.5)
    texture_mm = _check_number("texture_mm", texture_mm, positive=True)
    irregularity = _check_fraction("irregularity", irregularity, 0.0, 0.5)
    spread = (1 + irregularity) * ((1 + oedema_extent) if oedema > 0 else 1)
    diameter = _diameter(diameter_mm, rng, FLAIR_DIAMETER_RANGE_MM, spacing, img.shape, spread)
    if contrast is None:
        value = float(rng.uniform(*FLAIR_CONTRAST_RANGE) * span)
    else:
        value = _check_number("contrast", contrast, positive=True)
    return _textured_round(
        img, spacing, rng, kind="flair", diameter=diameter, contrast=value, centre=centre,
        placement_mask=placement_mask,
        default_region=lambda: body_mask_mr(img, (low, high)),
        default_name="placement_mask (default: head, > 10 % of intensity_range)",
        edge_fraction=edge_fraction, texture=texture, texture_mm=texture_mm, irregularity=irregularity,
        oedema=oedema, oedema_extent=oedema_extent, clip=(low, high),
    )


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
    img = _check_image(image)
    spacing = _check_spacing(pixel_spacing_mm)
    rng = _check_rng(rng)
    value = _check_number("contrast", contrast)
    expect(value != 0, "contrast", "a non-zero number (positive: bright star, negative: dark)", value)
    if arms is None:
        arms = int(rng.integers(STAR_ARMS_RANGE[0], STAR_ARMS_RANGE[1] + 1))
    ok = isinstance(arms, (int, np.integer)) and not isinstance(arms, bool) and 2 <= arms <= 64
    expect(ok, "arms", "an integer in [2, 64]", arms)
    arm_width = _check_fraction("arm_width", arm_width, 1e-3, 1.0)
    edge_fraction = _check_fraction("edge_fraction", edge_fraction, 1e-3, 0.5)
    diameter = _diameter(diameter_mm, rng, STAR_DIAMETER_RANGE_MM, spacing, img.shape, 1.0)
    rotation = float(rng.uniform(0, 2 * np.pi / arms))
    radius = diameter / 2
    c = _place(rng, img.shape, spacing, radius, centre, placement_mask,
               lambda: np.ones(img.shape, bool), "placement_mask (default: whole image)")
    dy, dx = _offsets_mm(img.shape, c, spacing)
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
    return _finish(img, amplitude * profile, [profile], profile, "star", c, diameter, spacing, params)


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
    img = _check_image(image)
    spacing = _check_spacing(pixel_spacing_mm)
    rng = _check_rng(rng)
    density = float(rng.uniform(*METAL_DENSITY_RANGE_HU)) if density_hu is None else _check_number("density_hu", density_hu)
    diameter = _diameter(diameter_mm, rng, METAL_DIAMETER_RANGE_MM, spacing, img.shape, 1.0)
    widest = diameter / max(spacing)
    if aspect is None:
        aspect = float(rng.uniform(1.0, min(3.0, widest)))
    aspect = _check_number("aspect", aspect)
    expect(1 <= aspect <= widest, "aspect", f"a ratio in [1, {widest:.3g}] (short axis >= 1 pixel)", aspect)
    angle = float(rng.uniform(0, np.pi))
    a, b = diameter / 2, diameter / 2 / aspect
    c = _place(rng, img.shape, spacing, a, centre, placement_mask,
               lambda: body_mask_ct(img), "placement_mask (default: body, HU > -500)")
    dy, dx = _offsets_mm(img.shape, c, spacing)
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    rho = np.hypot(u / a, v / b)
    edge = 0.25 * min(spacing)
    profile = expit((1 - rho) * b / edge)
    change = profile * (density - img.astype(np.float64))
    params = {"density_hu": density, "aspect": aspect, "angle_rad": angle, "edge_mm": edge}
    return _finish(img, change, [profile], profile, "metal", c, diameter, spacing, params)
