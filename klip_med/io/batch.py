"""Process a volume in slice batches on the working grid, and pool a volume map in 3D blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from klip_med.errors import expect
from klip_med.io.resample import KINDS, resample_inplane
from klip_med.io.volume import Volume
from klip_med.score.blocks import BlockScores, pool_blocks


@dataclass(frozen=True)
class SliceBatch:
    """Consecutive slices ``start:stop`` of a volume, ready for a sampler.

    Attributes:
        start, stop: slice range in the volume.
        images: float32 tensor ``(B, 1, h, w)`` (B = stop - start), on the working grid.
        sop_instance_uids: the source instance of each slice, or ``None`` without DICOM sources.
    """

    start: int
    stop: int
    images: torch.Tensor
    sop_instance_uids: tuple[str, ...] | None


def iter_slice_batches(
    volume: Volume, batch_size: int, working_size: tuple[int, int] | None = None
) -> Iterator[SliceBatch]:
    """Yield the volume's slices in batches of at most ``batch_size``, resampled to ``working_size``."""
    expect(isinstance(batch_size, int) and batch_size >= 1, "batch_size", "an int >= 1", batch_size)
    uids = volume.sop_instance_uids if volume.is_dicom else None
    for start in range(0, volume.shape[0], batch_size):
        stop = min(start + batch_size, volume.shape[0])
        images = torch.from_numpy(volume.pixels[start:stop].copy())[:, None]
        if working_size is not None:
            images = resample_inplane(images, working_size, kind="intensity")
        yield SliceBatch(start, stop, images, None if uids is None else uids[start:stop])


def map_slices(
    volume: Volume,
    fn: Callable[[torch.Tensor], torch.Tensor | Mapping[str, torch.Tensor]],
    *,
    batch_size: int = 8,
    working_size: tuple[int, int] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``fn`` on slice batches and assemble its outputs on the source grid.

    Args:
        volume: the input volume ``(Z, H, W)``.
        fn: takes ``(B, 1, h, w)`` float32 and returns a tensor, or a mapping of named tensors,
            each ``(B, h, w)`` or ``(B, 1, h, w)`` (e.g. ``{"recon": ..., "klip": ...}``).
        batch_size: slices per call (bounds memory).
        working_size: the prior's ``(h, w)``; ``None`` keeps the source matrix.
        kinds: how each output goes back to the source grid: ``"intensity"`` (default),
            ``"density"`` (nats per pixel; sums kept) or ``"label"``. A bare tensor is key ``"out"``.

    Returns:
        ``{name: float32 (Z, H, W)}`` on the source grid, slices in volume order.
    """
    kinds = dict(kinds or {})
    for key, kind in kinds.items():
        expect(kind in KINDS, f"kinds[{key!r}]", f"one of {KINDS}", kind)
    outputs: dict[str, np.ndarray] = {}
    for batch in iter_slice_batches(volume, batch_size, working_size):
        result = fn(batch.images)
        named = {"out": result} if isinstance(result, torch.Tensor) else dict(result)
        for key, value in named.items():
            v = value.detach().to("cpu", torch.float32)
            if v.ndim == 4:
                expect(v.shape[1] == 1, f"fn output {key!r}", "(B, 1, h, w) or (B, h, w)", tuple(v.shape))
                v = v[:, 0]
            n = batch.stop - batch.start
            expect(v.ndim == 3 and v.shape[0] == n, f"fn output {key!r}",
                   f"{n} slices shaped (B, h, w)", f"shape {tuple(value.shape)}")
            back = resample_inplane(v, volume.shape[1:], kind=kinds.get(key, "intensity"))
            if key not in outputs:
                outputs[key] = np.zeros(volume.shape, dtype=np.float32)
            outputs[key][batch.start : batch.stop] = back.numpy()
    return outputs


def pool_volume_map(pixel_map: np.ndarray, block_size: int | Sequence[int]) -> BlockScores:
    """Pool a ``(Z, H, W)`` per-pixel KLIP map (nats per pixel) in 3D blocks (bd, bh, bw).

    Thin wrapper over :func:`klip_med.score.blocks.pool_blocks` with ``ndim=3``; partial edge
    blocks are kept. Slices must be consecutive along the normal (as a read volume is).
    """
    arr = np.asarray(pixel_map)
    expect(arr.ndim == 3, "pixel_map", "a (Z, H, W) map", f"shape {arr.shape}")
    return pool_blocks(torch.from_numpy(arr.astype(np.float32)), block_size, ndim=3)


def blocks_to_voxels(scores: BlockScores, shape: tuple[int, int, int]) -> np.ndarray:
    """Paint each block's density (nats per pixel) on its voxels: float32 ``shape`` (Z, H, W)."""
    dens = scores.densities.detach().cpu().numpy()
    expect(dens.ndim == 3, "scores", "3D block scores of one volume", f"densities {dens.shape}")
    bd, bh, bw = scores.block_size
    full = np.repeat(np.repeat(np.repeat(dens, bd, axis=0), bh, axis=1), bw, axis=2)
    z, h, w = shape
    expect(full.shape[0] >= z and full.shape[1] >= h and full.shape[2] >= w, "shape",
           f"at most the pooled extent {full.shape}", shape)
    return np.ascontiguousarray(full[:z, :h, :w], dtype=np.float32)
