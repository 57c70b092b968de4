"""Resampling between grids: the source grid, the prior's working grid, and other volumes.

Two jobs:

- In plane, between the source matrix (e.g. 512 x 512) and the prior's working matrix (e.g.
  128 x 128) covering the same field of view (pixel *edges* aligned, as ``align_corners=False``):
  :func:`resample_inplane`, :func:`working_grid`, :func:`to_source_grid`. The ``kind`` says what
  the values are: ``"intensity"`` (averaged when shrinking, bilinear when growing), ``"density"``
  (a per-pixel amount such as nats per pixel: resampled like an intensity, then scaled by the
  pixel-area ratio so the sum over a region is kept), or ``"label"`` (nearest neighbour).
- Between two volumes in patient space (e.g. a NIfTI label map onto a DICOM series):
  :func:`resample_to`, through the two affines.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from klip_med.errors import expect
from klip_med.io.volume import Volume

KINDS = ("intensity", "density", "label")


def resample_inplane(
    values: np.ndarray | torch.Tensor, size: tuple[int, int], *, kind: str = "intensity"
) -> np.ndarray | torch.Tensor:
    """Resample the last two axes ``(..., H, W)`` to ``size = (h, w)`` over the same field of view.

    Args:
        values: numpy array or tensor ``(..., H, W)``.
        size: target ``(h, w)`` pixels.
        kind: ``"intensity"``, ``"density"`` (per-pixel amount; sums kept) or ``"label"``.

    Returns:
        The same type as ``values`` (float32, or the input dtype for labels), ``(..., h, w)``.
    """
    expect(kind in KINDS, "kind", f"one of {KINDS}", kind)
    is_numpy = isinstance(values, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(values)) if is_numpy else values
    expect(t.ndim >= 2, "values", "an array (..., H, W)", f"shape {tuple(t.shape)}")
    h, w = (int(s) for s in size)
    expect(h >= 1 and w >= 1, "size", "two positive ints (h, w)", size)
    H, W = int(t.shape[-2]), int(t.shape[-1])
    lead = t.shape[:-2]
    flat = t.reshape(-1, 1, H, W)
    if (h, w) == (H, W):
        out = flat.clone()
    elif kind == "label":
        out = F.interpolate(flat.to(torch.float64), size=(h, w), mode="nearest-exact").to(t.dtype)
    else:
        x = flat.to(torch.float32)
        if h <= H and w <= W:
            out = F.interpolate(x, size=(h, w), mode="area")
        elif h >= H and w >= W:
            out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        else:
            out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if kind == "density":
            out = out * float(H * W) / float(h * w)
    out = out.reshape(*lead, h, w)
    return out.numpy() if is_numpy else out


def _inplane_affine(affine: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Affine of a (h, w) grid covering the field of view of a (H, W) grid (edges aligned)."""
    (H, W), (h, w) = src, dst
    sr, sc = H / h, W / w
    out = np.array(affine, dtype=np.float64)
    out[:3, 0] = affine[:3, 0] * sc
    out[:3, 1] = affine[:3, 1] * sr
    out[:3, 3] = affine[:3, 3] + 0.5 * (sc - 1) * affine[:3, 0] + 0.5 * (sr - 1) * affine[:3, 1]
    return out


def working_grid(volume: Volume, size: tuple[int, int], *, kind: str = "intensity") -> Volume:
    """The volume on the prior's in-plane working grid ``(h, w)``, with its geometry updated.

    Slices are kept (one working slice per source slice). The result has ``datasets=None``: it
    does not sit on the source images; bring results back with :func:`to_source_grid`.
    """
    pixels = resample_inplane(volume.pixels, size, kind=kind)
    affine = _inplane_affine(volume.affine, volume.shape[1:], tuple(int(s) for s in size))
    return Volume(pixels, affine, None, f"{volume.source} on a {size[0]}x{size[1]} working grid")


def to_source_grid(values: np.ndarray, source: Volume, *, kind: str = "intensity") -> np.ndarray:
    """Bring ``(Z, h, w)`` working-grid values back onto ``source``'s ``(Z, H, W)`` grid.

    For a KLIP map in nats per working pixel use ``kind="density"``: the result is in nats per
    *source* pixel, and block sums are kept.
    """
    arr = np.asarray(values)
    expect(arr.ndim == 3 and arr.shape[0] == source.shape[0], "values",
           f"(Z={source.shape[0]}, h, w) working-grid slices", f"shape {arr.shape}")
    return np.asarray(resample_inplane(arr, source.shape[1:], kind=kind))


def resample_to(moving: Volume, reference: Volume, *, order: int = 0, fill: float = 0.0) -> np.ndarray:
    """Sample ``moving`` at the voxel centres of ``reference`` through patient space.

    Args:
        moving: the volume to resample (e.g. a NIfTI label map).
        reference: the target grid (e.g. a DICOM series).
        order: 0 nearest neighbour (labels; exact when the grids coincide up to axis flips /
            permutations), 1 trilinear.
        fill: value outside ``moving``.

    Returns:
        float32 ``(Z, H, W)`` on ``reference``'s grid.
    """
    expect(order in (0, 1), "order", "0 (nearest) or 1 (linear)", order)
    # (i, j, k) of reference -> LPS -> (i, j, k) of moving; then reverse the axes to (k, j, i).
    m = np.linalg.inv(moving.affine) @ reference.affine
    rev = np.eye(4)[[2, 1, 0, 3]]
    m = rev @ m @ rev
    out = ndimage.affine_transform(
        moving.pixels, m[:3, :3], offset=m[:3, 3], output_shape=reference.shape, order=order,
        mode="grid-constant", cval=fill, prefilter=False,  # nearest: voxels extend +-0.5
    )
    return out.astype(np.float32, copy=False)
