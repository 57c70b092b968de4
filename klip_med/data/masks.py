"""The one body mask of klip_med: which pixels of a slice are the patient (head or body).

Every place that needs "inside the body" asks :func:`body_mask`: the blocks a KLIP map is scored
over (on the posterior mean, any intensity range, Otsu threshold), the body fraction of a slice
when a benchmark chooses slices (prior units, a fixed level), and where a synthetic lesion may be
placed (HU or MR signal, a fixed level).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from klip_med.errors import KLIPMedError

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


def _fill(mask: np.ndarray) -> np.ndarray:
    """Holes filled slice by slice (a (D, H, W) stack is not filled across slices)."""
    if mask.ndim == 3:
        return np.stack([ndimage.binary_fill_holes(s) for s in mask])
    return ndimage.binary_fill_holes(mask)


def body_mask(image, level: float | None = None, *, largest: bool = True, fill_holes: bool = True):
    """Body (or head) mask of a slice or a stack of slices.

    Args:
        image: (H, W) or (D, H, W) intensities, numpy array or torch tensor, any range.
        level: pixels strictly above it are body; None: Otsu's threshold of the whole input
            (the default for reconstructions, whose range is not known in advance).
        largest: keep only the largest connected component (drops the table, noise specks).
        fill_holes: fill enclosed holes (lungs, bowel gas, ventricles dark on some contrasts).

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
    # compared in the input's own precision (a fixed level), or on float64 values (Otsu)
    mask = arr.astype(np.float64) > otsu_threshold(arr.astype(np.float64)) if level is None else arr > float(level)
    if largest:
        labels, n = ndimage.label(mask)
        if n > 1:
            sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
            mask = labels == (1 + int(np.argmax(sizes)))
    if fill_holes:
        mask = _fill(mask)
    return torch.from_numpy(mask).to(image.device) if is_tensor else mask


def body_fraction(image: np.ndarray, level: float = BODY_LEVEL_PRIOR) -> float:
    """Fraction of the pixels of an (H, W) slice in prior units above ``level`` (no component or
    hole rules: a quick measure of how much of the field of view is patient)."""
    return float(body_mask(image, level, largest=False, fill_holes=False).mean())
