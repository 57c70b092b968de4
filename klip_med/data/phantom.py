"""Pure-synthetic 2D phantoms (no data needed) for tests and demos, with or without a lesion.

``ct_phantom``: an axial abdomen in HU (air -1000, subcutaneous fat ~-100, soft tissue ~40, a
liver-like region ~60 on the image left (the patient's right), spleen ~50, kidneys ~30, vertebral
body ~700, spinal canal ~20). ``mr_phantom``: an axial FLAIR-like head scaled to [0, 1] (scalp,
dark skull and CSF, grey matter ~0.55, white matter ~0.42, dark ventricles).

Shapes are ellipses defined on the field of view, so any image size works (pixels are square,
``pixel_spacing_mm = fov_mm / max(H, W)``). With a ``numpy.random.Generator`` the geometry
(+-5 %), the intensities and a smooth texture vary; with ``rng=None`` the phantom is the nominal one.
Images are float32 (H, W); masks are bool (H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from klip_med.data.lesions import Inserted, insert_ct_lesion, insert_flair_lesion, insert_metal, insert_star
from klip_med.errors import expect

KINDS = ("ct_hypo", "ct_hyper", "ct_star", "metal", "flair", "mr_star")
"""Lesion kinds :func:`phantom_with_lesion` knows."""


@dataclass(frozen=True)
class Phantom:
    """A synthetic slice.

    Attributes:
        image: (H, W) float32; HU for CT, [0, 1] for MR.
        pixel_spacing_mm: (row, col) in mm.
        masks: bool (H, W) regions; CT: ``body``, ``liver``, ``spine``; MR: ``head``, ``brain``,
            ``white_matter``.
        modality: ``"ct"`` or ``"mr"``.
    """

    image: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    masks: dict[str, np.ndarray]
    modality: str


class _Draw:
    """Ellipses on normalised coordinates (u: columns, v: rows, both -1..1 across the FOV)."""

    def __init__(self, size: object, fov_mm: object, rng: object) -> None:
        pair = size if isinstance(size, (tuple, list)) else (size, size)
        ok = len(pair) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 8 for n in pair)
        expect(ok, "size", "an integer >= 8 or an (H, W) pair of them", size)
        ok = isinstance(fov_mm, (int, float)) and not isinstance(fov_mm, bool) and math.isfinite(fov_mm)
        expect(ok and fov_mm > 0, "fov_mm", "a finite number > 0", fov_mm)
        expect(rng is None or isinstance(rng, np.random.Generator), "rng", "a numpy.random.Generator or None",
               type(rng).__name__)
        self.shape = (int(pair[0]), int(pair[1]))
        self.spacing = fov_mm / max(self.shape)
        self.rng = rng
        half = fov_mm / 2
        self.v, self.u = np.meshgrid((np.arange(pair[0]) - (pair[0] - 1) / 2) * self.spacing / half,
                                     (np.arange(pair[1]) - (pair[1] - 1) / 2) * self.spacing / half, indexing="ij")

    def jitter(self, value: float, spread: float) -> float:
        """``value`` +- ``spread`` (uniform) with a generator, else ``value``."""
        return value if self.rng is None else value + spread * float(self.rng.uniform(-1, 1))

    def ellipse(self, cu: float, cv: float, au: float, av: float, angle_deg: float = 0.0) -> np.ndarray:
        t = math.radians(angle_deg)
        du, dv = self.u - cu, self.v - cv
        x = du * math.cos(t) + dv * math.sin(t)
        y = -du * math.sin(t) + dv * math.cos(t)
        return (x / au) ** 2 + (y / av) ** 2 <= 1

    def texture(self, sigma_mm: float) -> np.ndarray:
        """Smoothed unit-std noise, or zeros without a generator."""
        if self.rng is None:
            return np.zeros(self.shape)
        g = gaussian_filter(self.rng.standard_normal(self.shape), sigma_mm / self.spacing)
        return g / max(float(g.std()), 1e-12)


def ct_phantom(size: int | tuple[int, int] = 128, rng: np.random.Generator | None = None, *,
               fov_mm: float = 400.0, texture_hu: float = 5.0) -> Phantom:
    """Axial abdomen phantom in HU on a ``fov_mm`` field of view; ``texture_hu``: std of the
    smooth tissue texture inside the body (only with ``rng``)."""
    d = _Draw(size, fov_mm, rng)
    j = d.jitter
    cu, cv, au, av = j(0.0, 0.02), j(0.02, 0.02), j(0.85, 0.04), j(0.62, 0.03)
    tilt = j(0.0, 3.0)
    body = d.ellipse(cu, cv, au, av, tilt)
    inner = d.ellipse(cu, cv, 0.9 * au, 0.9 * av, tilt)
    liver = d.ellipse(j(-0.38, 0.02), j(-0.08, 0.02), j(0.33, 0.02), j(0.30, 0.02), j(-25.0, 5.0)) & inner
    spleen = d.ellipse(j(0.45, 0.02), j(0.0, 0.02), 0.12, 0.18, 20.0) & inner & ~liver
    kidneys = d.ellipse(-0.22, 0.28, 0.08, 0.12, -20.0) | d.ellipse(0.22, 0.28, 0.08, 0.12, 20.0)
    spine = d.ellipse(j(0.0, 0.01), j(0.38, 0.01), j(0.10, 0.005), j(0.09, 0.005))
    canal = d.ellipse(0.0, 0.52, 0.04, 0.04)
    image = np.full(d.shape, -1000.0)
    for region, hu, spread in ((body, -100.0, 10.0), (inner, 40.0, 5.0), (liver, 60.0, 5.0),
                               (spleen, 50.0, 5.0), (kidneys & inner, 30.0, 5.0),
                               (spine, 700.0, 50.0), (canal, 20.0, 5.0)):
        image[region] = j(hu, spread)
    image = gaussian_filter(image, 0.5)
    image = np.where(body, image + texture_hu * d.texture(3.0), -1000.0)
    masks = {"body": body, "liver": liver, "spine": spine}
    return Phantom(image.astype(np.float32), (d.spacing, d.spacing), masks, "ct")


def mr_phantom(size: int | tuple[int, int] = 128, rng: np.random.Generator | None = None, *,
               fov_mm: float = 240.0, noise: float = 0.01) -> Phantom:
    """Axial FLAIR-like head phantom in [0, 1]; ``noise``: std of white noise in the head (with ``rng``)."""
    d = _Draw(size, fov_mm, rng)
    j = d.jitter
    cu, cv, au, av = j(0.0, 0.02), j(0.0, 0.02), j(0.62, 0.03), j(0.78, 0.03)
    layers = [(1.0, j(0.6, 0.05)), (0.94, 0.05), (0.89, 0.12), (0.86, j(0.55, 0.03)), (0.72, j(0.42, 0.03))]
    image = np.zeros(d.shape)
    regions = {}
    for scale, value in layers:
        regions[scale] = d.ellipse(cu, cv, scale * au, scale * av)
        image[regions[scale]] = value
    ventricles = (d.ellipse(cu - 0.1, cv - 0.05, 0.06, j(0.2, 0.02), 15.0)
                  | d.ellipse(cu + 0.1, cv - 0.05, 0.06, j(0.2, 0.02), -15.0))
    image[ventricles] = 0.1
    image = gaussian_filter(image, 0.5) + 0.02 * d.texture(3.0)
    if rng is not None:
        image = image + noise * rng.standard_normal(d.shape)
    image = np.clip(np.where(regions[1.0], image, 0.0), 0.0, 1.0)
    masks = {"head": regions[1.0], "brain": regions[0.89], "white_matter": regions[0.72] & ~ventricles}
    return Phantom(image.astype(np.float32), (d.spacing, d.spacing), masks, "mr")


def phantom_with_lesion(kind: str, rng: np.random.Generator, *, size: int | tuple[int, int] = 128,
                        fov_mm: float | None = None, **lesion_kwargs) -> tuple[Phantom, Inserted]:
    """A random phantom and the same phantom with one lesion of ``kind`` (see ``KINDS``).

    Placement (unless ``centre`` or ``placement_mask`` is given): CT lesions in the liver, stars and
    metal in the body, FLAIR lesions in the brain. Defaults: ``ct_hypo`` / ``ct_hyper`` sample
    the contrast magnitude in [10, 60] HU with the kind's sign; ``ct_star`` contrast 200 HU;
    ``mr_star`` contrast 0.3. ``lesion_kwargs`` go to the insertion function.

    Returns:
        (healthy phantom, (image, mask, lesion)).
    """
    expect(kind in KINDS, "kind", f"one of {', '.join(KINDS)}", kind)
    expect(isinstance(rng, np.random.Generator), "rng", "a numpy.random.Generator", type(rng).__name__)
    ct = kind in ("ct_hypo", "ct_hyper", "ct_star", "metal")
    fov = fov_mm if fov_mm is not None else (400.0 if ct else 240.0)
    phantom = (ct_phantom if ct else mr_phantom)(size, rng, fov_mm=fov)
    region = {"ct_hypo": "liver", "ct_hyper": "liver", "ct_star": "body", "metal": "body",
              "flair": "brain", "mr_star": "brain"}[kind]
    if "centre" not in lesion_kwargs:
        lesion_kwargs.setdefault("placement_mask", phantom.masks[region])
    args = (phantom.image, phantom.pixel_spacing_mm, rng)
    if kind in ("ct_hypo", "ct_hyper"):
        sign = -1.0 if kind == "ct_hypo" else 1.0
        contrast = lesion_kwargs.pop("contrast_hu", None)
        if contrast is None:
            contrast = sign * float(rng.uniform(10.0, 60.0))
        expect(isinstance(contrast, (int, float)) and contrast * sign > 0, "contrast_hu",
               f"a {'negative' if sign < 0 else 'positive'} number for kind {kind!r}", contrast)
        return phantom, insert_ct_lesion(*args, contrast_hu=contrast, **lesion_kwargs)
    if kind == "flair":
        return phantom, insert_flair_lesion(*args, **lesion_kwargs)
    if kind == "metal":
        return phantom, insert_metal(*args, **lesion_kwargs)
    lesion_kwargs.setdefault("contrast", 200.0 if ct else 0.3)
    return phantom, insert_star(*args, **lesion_kwargs)
