"""A fitted null model applied to one reconstruction: its block densities, covariates and in-body
blocks, then combined z-scores and p-values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from klip_med.calibration.covariates import block_covariates
from klip_med.calibration.null_model import NullModel
from klip_med.score.blocks import block_to_pixels, blocks_inside_mask, pool_blocks


def inside_blocks(body_mask, block_size: int) -> np.ndarray:
    """(gh, gw) bool blocks at least half inside ``body_mask`` ((H, W) bool, tensor or array); all
    blocks when none is (what a null model scores and a slice-centred model takes its median over)."""
    inside = blocks_inside_mask(torch.as_tensor(np.asarray(body_mask, dtype=bool)), block_size).numpy()
    return inside if inside.any() else np.ones_like(inside)


def result_blocks(result, block_size: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """``(densities, covariates, inside)`` of one reconstruction (a
    :class:`klip_med.pipeline.SliceResult`): (W, gh, gw) block densities of every window's KLIP map
    (nats per pixel), :func:`~klip_med.calibration.covariates.block_covariates`, and (gh, gw)
    in-body blocks (all blocks when none is inside)."""
    densities = pool_blocks(result.klip, block_size).densities.numpy()
    inside = inside_blocks(result.body_mask, block_size)
    return densities, block_covariates(result.recon_mean.numpy(), result.body_mask.numpy(), block_size), inside


def apply_null(null: NullModel, result,
               windows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Combined z-scores and p-values (each (gh, gw)) of one reconstruction's blocks under ``null``.

    Args:
        windows: indices into the result's windows of the model's windows, in the model's order
            (:func:`null_windows`); None: the result's windows are exactly the model's.
    """
    densities, covariates, inside = result_blocks(result, int(null.conditions["block_size"]))
    if windows is not None:
        densities = densities[list(windows)]
    z = null.z_scores(densities, covariates, inside)
    return z, null.p_values(z)


def z_pixel_map(null: NullModel, result, windows: Sequence[int] | None = None) -> tuple[np.ndarray, float | None, int]:
    """One reconstruction's combined z-scores on its pixels, its largest in-body z and its in-body blocks.

    Returns:
        ``(z_map, z_max, n_inside)``: (H, W) float64, each block's z on its pixels and 0 for blocks
        outside the body; the largest z over in-body blocks (None when no block is inside the body);
        the number of in-body blocks (what slice- and volume-level p-values correct for).
    """
    size = int(null.conditions["block_size"])
    z, _ = apply_null(null, result, windows)
    inside = blocks_inside_mask(result.body_mask, size).numpy()
    z_map = block_to_pixels(np.where(inside, z, 0.0), size, tuple(result.body_mask.shape))
    return z_map, (float(z[inside].max()) if inside.any() else None), int(inside.sum())
