"""Block pooling of per-pixel KLIP maps, after sampling, and image-level scores.

Blocks tile the image from its top-left corner (or the volume from its first slice). When the
block size does not divide the image, the last row / column (/ slab) of blocks is partial: it is
kept, its pixel count is reported, and its density (nats per pixel) stays comparable with full
blocks. Because pooling happens on the per-pixel map, the block size is a free choice after
sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from klip_med.errors import KLIPMedError


@dataclass(frozen=True)
class BlockScores:
    """Block-pooled maps.

    Attributes:
        sums: block sums, shape (..., *grid) (nats for transition / sde maps).
        densities: block sums divided by the block's pixel count (nats per pixel), same shape.
        pixel_counts: pixels in each block, shape ``grid`` (int64); smaller at partial edges.
        block_size: (bh, bw) or (bd, bh, bw).
        partial: bool, shape ``grid``: blocks cut by the image edge.
    """

    sums: Tensor
    densities: Tensor
    pixel_counts: Tensor
    block_size: tuple[int, ...]
    partial: Tensor

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of blocks along each spatial axis."""
        return tuple(self.pixel_counts.shape)

    def sample_spread(self, sample_dim: int = -3) -> tuple[Tensor, Tensor]:
        """Mean and unbiased std of the block sums across posterior samples.

        Args:
            sample_dim: axis of ``sums`` holding the samples (default: the one before a 2D grid).
        """
        n = self.sums.shape[sample_dim]
        mean = self.sums.mean(dim=sample_dim)
        std = self.sums.std(dim=sample_dim) if n > 1 else torch.zeros_like(mean)
        return mean, std


def _as_block_size(block_size: int | Sequence[int], spatial: Sequence[int]) -> tuple[int, ...]:
    ndim = len(spatial)
    size = (block_size,) * ndim if isinstance(block_size, int) else tuple(int(b) for b in block_size)
    if len(size) != ndim:
        raise KLIPMedError(f"block_size: expected an int or {ndim} ints, found {block_size!r}")
    for b, n in zip(size, spatial, strict=True):
        if b < 1 or b > n:
            raise KLIPMedError(
                f"block_size: expected each side in [1, image size {tuple(spatial)}], found {size}"
            )
    return size


def pool_blocks(pixel_map: Tensor, block_size: int | Sequence[int], ndim: int = 2) -> BlockScores:
    """Sum a per-pixel map over blocks.

    Args:
        pixel_map: (..., H, W) for ``ndim=2`` or (..., D, H, W) for ``ndim=3`` (D = slices,
            consecutive along the slice normal).
        block_size: one int for square / cubic blocks, or (bh, bw) / (bd, bh, bw) pixels.
        ndim: 2 (blocks in each slice) or 3 (blocks across slices).

    Returns:
        :class:`BlockScores` with sums and densities of shape (..., *grid).
    """
    if ndim not in (2, 3):
        raise KLIPMedError(f"ndim: expected 2 or 3, found {ndim}")
    if pixel_map.ndim < ndim:
        raise KLIPMedError(
            f"pixel_map: expected at least {ndim} dimensions, found shape {tuple(pixel_map.shape)}"
        )
    spatial = tuple(pixel_map.shape[-ndim:])
    size = _as_block_size(block_size, spatial)
    lead = pixel_map.shape[:-ndim]
    grid = tuple(-(-n // b) for n, b in zip(spatial, size, strict=True))
    pad = []
    for n, b, g in reversed(list(zip(spatial, size, grid, strict=True))):
        pad += [0, g * b - n]
    flat = pixel_map.reshape(-1, 1, *spatial).to(torch.float32)
    ones = torch.ones((1, 1, *spatial), dtype=torch.float32, device=pixel_map.device)
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    full = float(np.prod(size))
    sums = pool(F.pad(flat, pad), size, stride=size) * full
    counts = (pool(F.pad(ones, pad), size, stride=size) * full).round().to(torch.int64)[0, 0]
    sums = sums.reshape(*lead, *grid)
    return BlockScores(
        sums=sums,
        densities=sums / counts.to(sums.dtype),
        pixel_counts=counts,
        block_size=size,
        partial=counts < int(full),
    )


def block_to_pixels(blocks: np.ndarray, block_size: int, shape: Sequence[int]) -> np.ndarray:
    """Block values ``(..., gh, gw)`` repeated onto their pixels ``(..., H, W)`` (``shape`` = (H, W);
    partial edge blocks cut at the image edge), the inverse layout of :func:`pool_blocks`."""
    a = np.asarray(blocks)
    full = np.repeat(np.repeat(a, block_size, axis=-2), block_size, axis=-1)
    return np.ascontiguousarray(full[..., : int(shape[0]), : int(shape[1])])


def blocks_inside_mask(
    mask: Tensor, block_size: int | Sequence[int], min_fraction: float = 0.5
) -> Tensor:
    """Which blocks lie inside a mask: at least ``min_fraction`` of their pixels are in it.

    Args:
        mask: bool (H, W) or (D, H, W).
        block_size: as in :func:`pool_blocks`.
        min_fraction: in (0, 1].

    Returns:
        bool tensor of shape ``grid``.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise KLIPMedError(f"min_fraction: expected a value in (0, 1], found {min_fraction}")
    pooled = pool_blocks(mask.to(torch.float32), block_size, ndim=mask.ndim)
    return pooled.densities >= min_fraction


@dataclass(frozen=True)
class ImageScore:
    """Image-level KLIP score.

    Attributes:
        max: the largest block statistic inside the mask.
        topk_mean: mean of the ``k`` largest block statistics inside the mask.
        argmax: grid index of the highest block.
        statistic: ``"density"`` (nats / pixel) or ``"sum"`` (nats per block).
        blocks_in_mask: how many blocks were eligible.
    """

    max: float
    topk_mean: float
    argmax: tuple[int, ...]
    statistic: str
    blocks_in_mask: int


def image_score(
    blocks: BlockScores,
    inside: Tensor,
    k: int = 5,
    statistic: str = "density",
) -> ImageScore:
    """Max and top-k mean of block scores over the blocks inside the body mask.

    Args:
        blocks: block scores of ONE image / volume: ``sums`` of shape ``grid`` (average the
            samples first).
        inside: bool, shape ``grid`` (from :func:`blocks_inside_mask`).
        k: number of top blocks averaged (clipped to the eligible count).
        statistic: ``"density"`` (default; fair to partial edge blocks) or ``"sum"``.
    """
    if statistic not in ("density", "sum"):
        raise KLIPMedError(f"statistic: expected 'density' or 'sum', found {statistic!r}")
    values = blocks.densities if statistic == "density" else blocks.sums
    if tuple(values.shape) != blocks.grid:
        raise KLIPMedError(
            f"blocks: expected scores of one image with shape {blocks.grid}, found "
            f"{tuple(values.shape)} (average the samples first)"
        )
    if tuple(inside.shape) != blocks.grid:
        raise KLIPMedError(f"inside: expected shape {blocks.grid}, found {tuple(inside.shape)}")
    if k < 1:
        raise KLIPMedError(f"k: expected >= 1, found {k}")
    n_inside = int(inside.sum())
    if n_inside == 0:
        raise KLIPMedError("inside: expected at least one block inside the mask, found none")
    masked = torch.where(inside, values, torch.full_like(values, -torch.inf))
    flat = masked.flatten()
    top = torch.topk(flat, min(k, n_inside)).values
    arg = int(torch.argmax(flat))
    argmax = tuple(int(i) for i in np.unravel_index(arg, blocks.grid))
    return ImageScore(
        max=float(top[0]),
        topk_mean=float(top.mean()),
        argmax=argmax,
        statistic=statistic,
        blocks_in_mask=n_inside,
    )
