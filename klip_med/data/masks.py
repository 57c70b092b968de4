"""The one body mask of klip_med: which pixels of a slice are the patient (head or body).

Every place that needs "inside the body" asks :func:`body_mask`: the blocks a KLIP map is scored
over (on the posterior mean, any intensity range: the outline rule below), the body fraction of a
slice when a benchmark chooses slices (prior units, a fixed level), and where a synthetic lesion may
be placed (HU or MR signal, a fixed level).

The outline rule (no ``level``), per slice: pixels above a low threshold (the smaller of Otsu's
threshold and 10% of the way from the 1st to the 99th percentile), a morphological closing with a
disk of 3% of the image side (closes an open scalp ring, joins a skull-base outline broken by
sinuses and air), the largest connected component, holes filled. Otsu alone picked only the bright
scalp on about a fifth of real FLAIR slices (an open ring, so nothing was filled); the check on
every dev slice is ``examples/body_mask_check.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from klip_med.errors import KLIPMedError

OUTLINE_FRACTION = 0.1
"""The outline threshold: this fraction of the way from the 1st to the 99th intensity percentile."""
CLOSING_FRACTION = 0.03
"""Radius of the closing disk as a fraction of the smaller image side (at least 2 pixels)."""
BODY_LEVEL_HU = -500.0
"""CT: pixels above this HU value are body (air and gas below; lungs are filled as holes)."""
BODY_LEVEL_PRIOR = -0.9
"""Prior units ([-1, 1]): pixels above this level count as body when slices are chosen."""
MR_BODY_FRACTION = 0.1
"""MR signal: pixels above this fraction of the intensity range are head / body."""


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape, any range): the histogram bin centre that
    maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def outline_threshold(values: np.ndarray) -> float:
    """The outline rule's threshold of one slice: ``min(Otsu, p1 + OUTLINE_FRACTION * (p99 - p1))``."""
    lo, hi = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    return min(otsu_threshold(values), lo + OUTLINE_FRACTION * (hi - lo))


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _outline(slice_: np.ndarray) -> np.ndarray:
    """The outline rule on one (H, W) slice (module docstring)."""
    r = max(2, int(round(CLOSING_FRACTION * min(slice_.shape))))
    padded = np.pad(slice_ > outline_threshold(slice_), r + 1)  # closing must not erode at the image border
    closed = ndimage.binary_closing(padded, structure=_disk(r))[r + 1 : -(r + 1), r + 1 : -(r + 1)]
    return ndimage.binary_fill_holes(_largest(closed))


def _fill(mask: np.ndarray) -> np.ndarray:
    """Holes filled slice by slice (a (D, H, W) stack is not filled across slices)."""
    if mask.ndim == 3:
        return np.stack([ndimage.binary_fill_holes(s) for s in mask])
    return ndimage.binary_fill_holes(mask)


def body_mask(image, level: float | None = None, *, largest: bool = True, fill_holes: bool = True):
    """Body (or head) mask of a slice or a stack of slices.

    Args:
        image: (H, W) or (D, H, W) intensities, numpy array or torch tensor, any range.
        level: pixels strictly above it are body (then ``largest`` and ``fill_holes`` apply); None:
            the outline rule of the module docstring, slice by slice (the default for
            reconstructions, whose range is not known in advance).
        largest: with a ``level``, keep only the largest connected component (drops the table,
            noise specks).
        fill_holes: with a ``level``, fill enclosed holes (lungs, bowel gas, dark ventricles).

    Returns:
        bool mask of the same shape, as a tensor on the input's device for tensor input, else a
        numpy array.
    """
    is_tensor = isinstance(image, torch.Tensor)
    arr = image.detach().cpu().numpy() if is_tensor else np.asarray(image)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if arr.ndim not in (2, 3):
        raise KLIPMedError(f"image: expected (H, W) or (D, H, W), found {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise KLIPMedError("image: expected finite intensities for the body mask, found NaN / Inf")
    if level is None:
        values = arr.astype(np.float64)
        mask = _outline(values) if values.ndim == 2 else np.stack([_outline(s) for s in values])
        return torch.from_numpy(mask).to(image.device) if is_tensor else mask
    mask = arr > float(level)  # compared in the input's own precision
    if largest:
        mask = _largest(mask)
    if fill_holes:
        mask = _fill(mask)
    return torch.from_numpy(mask).to(image.device) if is_tensor else mask


def body_fraction(image: np.ndarray, level: float = BODY_LEVEL_PRIOR) -> float:
    """Fraction of the pixels of an (H, W) slice in prior units above ``level`` (no component or
    hole rules: a quick measure of how much of the field of view is patient)."""
    return float(body_mask(image, level, largest=False, fill_holes=False).mean())
