"""Per-block covariates of a reconstruction that a null model may compare blocks by: brightness,
texture (how much anatomy a block holds) and distance to the body edge."""

from __future__ import annotations

import numpy as np

from klip_med.errors import expect


def block_intensity(image: np.ndarray, block_size: int) -> np.ndarray:
    """Block means of an image, (gh, gw), blocks tiled from the top-left (partial edge blocks kept):
    :func:`klip_med.score.blocks.pool_blocks` densities."""
    import torch

    from klip_med.score.blocks import pool_blocks

    a = np.asarray(image, dtype=np.float64)
    expect(a.ndim == 2, "image", "an (H, W) array", f"shape {a.shape}")
    return pool_blocks(torch.from_numpy(a), block_size).densities.numpy()



def block_texture(image: np.ndarray, block_size: int) -> np.ndarray:
    """Standard deviation of the pixels of each block, (gh, gw), the same tiling as
    :func:`block_intensity` (how much anatomy a block holds: edges and texture raise it)."""
    from klip_med.score.blocks import block_to_pixels

    image = np.asarray(image, dtype=np.float64)
    deviation = image - block_to_pixels(block_intensity(image, block_size), block_size, image.shape)
    return np.sqrt(np.asarray(block_intensity(deviation**2, block_size), dtype=np.float64))


def block_covariates(mean_image: np.ndarray, body_mask: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    """Per-block covariates of one reconstruction, each (gh, gw): ``intensity`` (posterior-mean block
    mean, prior units), ``texture`` (posterior-mean block std, prior units) and ``edge_distance``
    (block mean of the distance to the body edge, pixels; 0 outside the body)."""
    from scipy import ndimage

    body = np.asarray(body_mask, dtype=bool)
    expect(body.shape == np.shape(mean_image), "body_mask", f"the image's shape {np.shape(mean_image)}", body.shape)
    return {"intensity": block_intensity(mean_image, block_size), "texture": block_texture(mean_image, block_size),
            "edge_distance": block_intensity(ndimage.distance_transform_edt(body), block_size)}

