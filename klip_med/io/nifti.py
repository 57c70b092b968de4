"""NIfTI in and out through nibabel, with the LPS (ours) <-> RAS (NIfTI) conversion explicit.

A NIfTI array is indexed ``data[i, j, k]`` = (column, row, slice) and its affine maps
(i, j, k) to RAS mm. A :class:`~klip_med.io.volume.Volume` holds ``pixels[k, j, i]`` and an
LPS affine on the same (i, j, k), so converting is a transpose plus ``diag(-1, -1, 1, 1)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from klip_med._atomic import atomic_path
from klip_med.errors import KLIPMedError, expect
from klip_med.io.volume import Volume, lps_to_ras, ras_to_lps


def read_nifti(path: str | os.PathLike[str]) -> Volume:
    """Read a 3D NIfTI-1/2 image (a 4D image with one volume is accepted).

    Returns:
        :class:`Volume` with float32 ``(Z, H, W)`` = ``data.transpose(2, 1, 0)``, the image's
        best affine (sform, else qform) converted from RAS to LPS, and ``datasets=None``.
    """
    p = Path(path)
    expect(p.is_file(), "path", "an existing NIfTI file", str(p))
    try:
        image = nib.load(p)
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:
        raise KLIPMedError(
            f"{p}: expected a readable NIfTI image, found {type(exc).__name__}: {exc}"
        ) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    expect(data.ndim == 3, str(p), "a 3D image (i, j, k)", f"shape {data.shape}")
    expect(np.issubdtype(data.dtype, np.number) and not np.iscomplexobj(data), str(p),
           "real-valued voxels", str(data.dtype))
    pixels = np.ascontiguousarray(np.transpose(data, (2, 1, 0)), dtype=np.float32)
    expect(bool(np.all(np.isfinite(pixels))), str(p), "finite voxels", "NaN / Inf")
    return Volume(pixels=pixels, affine=ras_to_lps(affine), datasets=None, source=str(p))


def write_nifti(
    values: Volume | np.ndarray,
    path: str | os.PathLike[str],
    reference: Volume | None = None,
    *,
    dtype: np.dtype | type = np.float32,
) -> Path:
    """Write ``(Z, H, W)`` values on a volume's grid as NIfTI (atomic), with the RAS affine.

    Args:
        values: a :class:`Volume`, or a ``(Z, H, W)`` array on ``reference``'s grid (for example
            the KLIP map in nats per pixel, or a reconstruction).
        path: ``.nii`` or ``.nii.gz``.
        reference: the volume whose geometry the array sits on (required for arrays).
        dtype: voxel type written (float32 by default; use uint8 / int16 for labels).

    Returns:
        The written path. Both sform and qform are set (code 1, scanner anatomical).
    """
    p = Path(path)
    expect(p.name.endswith((".nii", ".nii.gz")), "path", "a .nii or .nii.gz file name", p.name)
    if isinstance(values, Volume):
        pixels, affine = values.pixels, values.affine
    else:
        expect(reference is not None, "reference", "the Volume whose grid the array sits on", None)
        assert reference is not None
        pixels = np.asarray(values)
        expect(pixels.shape == reference.shape, "values",
               f"shape {reference.shape} (the reference grid, slices first)", f"shape {pixels.shape}")
        affine = reference.affine
    data = np.ascontiguousarray(np.transpose(pixels, (2, 1, 0))).astype(dtype)
    image = nib.Nifti1Image(data, lps_to_ras(affine))
    image.set_sform(lps_to_ras(affine), code=1)
    image.set_qform(lps_to_ras(affine), code=1)
    image.header.set_xyzt_units("mm")
    with atomic_path(p) as tmp:
        nib.save(image, tmp)
    return p
