"""The one body mask (klip_med.data.masks): the outline rule on reconstructions, fixed levels elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from klip_med.data.masks import BODY_LEVEL_HU, body_fraction, body_mask, otsu_threshold
from klip_med.errors import KLIPMedError


def _head_with_open_scalp(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Background -1, brain -0.55, a bright scalp ring open over 1 rad (as a skull-base slice or an
    incomplete FLAIR scalp), light noise. Returns (image, brain mask)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    r, theta = np.hypot(y - size / 2, x - size / 2), np.arctan2(y - size / 2, x - size / 2)
    img = np.full((size, size), -1.0)
    img[r < 0.34 * size] = -0.55
    img[(r >= 0.34 * size) & (r < 0.39 * size) & (np.abs(theta) > 0.5)] = 0.9
    return img + rng.normal(0.0, 0.03, img.shape), r < 0.33 * size


def test_outline_covers_a_head_whose_bright_scalp_ring_is_open():
    img, brain = _head_with_open_scalp()
    mask = body_mask(img)
    assert (mask & brain).sum() == brain.sum()  # all of the brain is body
    y, x = np.mgrid[:64, :64]
    assert not (mask & (np.hypot(y - 32, x - 32) > 27)).any()  # nothing beyond the scalp
    # the failure this rule replaces: Otsu keeps only the open ring, and an open ring has no hole to fill
    otsu = ndimage.binary_fill_holes(img > otsu_threshold(img))
    assert (otsu & brain).sum() < 0.05 * brain.sum()


def test_outline_drops_background_specks_and_keeps_shape_and_device():
    img, brain = _head_with_open_scalp(seed=1)
    img[3, 3] = img[60, 5] = 0.9  # isolated bright noise in the background
    mask = body_mask(torch.from_numpy(img))
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == (64, 64)
    assert not bool(mask[3, 3]) and not bool(mask[60, 5])
    stack = body_mask(np.stack([img, img[::-1]]))  # (D, H, W): slice by slice
    assert stack.shape == (2, 64, 64) and np.array_equal(stack[1], body_mask(img[::-1].copy()))


def test_fixed_levels_are_plain_thresholds_with_the_requested_rules():
    hu = np.full((32, 32), -1000.0, dtype=np.float32)
    hu[4:28, 4:28] = 40.0
    hu[12:20, 12:20] = -800.0  # a lung-like hole
    hu[30, 30] = 100.0  # a separate speck (the table, say)
    filled = body_mask(hu, BODY_LEVEL_HU, largest=False)
    assert filled[16, 16] and filled[30, 30] and filled.sum() == 24 * 24 + 1
    assert not body_mask(hu, BODY_LEVEL_HU)[30, 30]  # largest component only
    assert not body_mask(hu, BODY_LEVEL_HU, fill_holes=False)[16, 16]
    assert body_fraction(np.where(hu > 0, 0.0, -1.0).astype(np.float32)) == pytest.approx((24 * 24 - 64 + 1) / 1024)


def test_bad_input_is_refused_naming_the_image():
    with pytest.raises(KLIPMedError, match=r"image: expected \(H, W\) or \(D, H, W\)"):
        body_mask(np.zeros(8))
    with pytest.raises(KLIPMedError, match="image: expected finite intensities"):
        body_mask(np.full((8, 8), np.nan))
