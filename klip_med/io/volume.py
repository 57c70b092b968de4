"""The one volume type of klip_med.io: pixels, patient-space geometry and the source datasets.

Conventions (explicit, because they are easy to get wrong):

- ``pixels`` is float32, slices first: ``(Z, H, W)`` = (slice, row, column).
- ``affine`` is a 4x4 float64 matrix in DICOM patient space, **LPS** (x to the patient's Left,
  y to Posterior, z to Head), millimetres. It maps *(column, row, slice, 1)* -- the indices of
  ``pixels[slice, row, column]`` in reverse order, as in DICOM and NIfTI -- to patient
  coordinates::

      affine @ [c, r, k, 1] = ImagePositionPatient(k) + c * dc * X + r * dr * Y

  with X, Y the row / column direction cosines of ImageOrientationPatient and (dr, dc) =
  PixelSpacing. The third column is the slice step (normal times slice spacing).
- NIfTI uses RAS: :func:`lps_to_ras` flips the first two axes (``diag(-1, -1, 1, 1) @ affine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from klip_med.errors import expect

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Convert a 4x4 voxel-to-LPS affine to voxel-to-RAS (flip x and y). Returns a new array."""
    return LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)


def ras_to_lps(affine: np.ndarray) -> np.ndarray:
    """Convert a 4x4 voxel-to-RAS affine to voxel-to-LPS (the same flip; it is its own inverse)."""
    return LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)


@dataclass(frozen=True)
class Volume:
    """A stack of slices with its patient-space geometry.

    Attributes:
        pixels: float32 ``(Z, H, W)``; CT in Hounsfield units (rescale applied), other modalities
            in the source's modality units.
        affine: 4x4 float64, voxel (column, row, slice) -> LPS millimetres (see module docstring).
        datasets: the source pydicom datasets, one per slice in the order of ``pixels`` (header
            only: PixelData removed), or ``None`` for a NIfTI volume or a resampled one.
            Treat them as read-only; writers copy before changing anything.
        source: where the volume came from (folder, file or description), for messages.
        notes: what the reader had to repair in memory (e.g. UIDs taken from the file meta);
            the files themselves are never modified.
    """

    pixels: np.ndarray
    affine: np.ndarray
    datasets: tuple[Dataset, ...] | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        pixels = np.asarray(self.pixels)
        expect(pixels.ndim == 3, "Volume.pixels", "a (Z, H, W) array", f"shape {pixels.shape}")
        expect(min(pixels.shape) >= 1, "Volume.pixels", "non-empty axes", f"shape {pixels.shape}")
        affine = np.asarray(self.affine, dtype=np.float64)
        expect(affine.shape == (4, 4), "Volume.affine", "a 4x4 matrix", f"shape {affine.shape}")
        expect(
            bool(np.all(np.isfinite(affine))) and abs(np.linalg.det(affine[:3, :3])) > 1e-12,
            "Volume.affine",
            "a finite, invertible voxel-to-patient matrix",
            affine.tolist(),
        )
        if self.datasets is not None:
            expect(
                len(self.datasets) == pixels.shape[0],
                "Volume.datasets",
                f"one dataset per slice ({pixels.shape[0]})",
                f"{len(self.datasets)} datasets",
            )
        object.__setattr__(self, "pixels", pixels.astype(np.float32, copy=False))
        object.__setattr__(self, "affine", affine)
        if self.datasets is not None:
            object.__setattr__(self, "datasets", tuple(self.datasets))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, H, W)``."""
        z, h, w = self.pixels.shape
        return int(z), int(h), int(w)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, in the order of ``pixels``: (slice, row, column) = (dz, dr, dc)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[2]), float(norms[1]), float(norms[0])

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 voxel (column, row, slice) -> RAS mm, as NIfTI stores it."""
        return lps_to_ras(self.affine)

    @property
    def is_dicom(self) -> bool:
        """True when the volume carries its source DICOM datasets (it can be written as DICOM)."""
        return self.datasets is not None

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """SOPInstanceUID of each slice's source image, in slice order."""
        expect(self.is_dicom, "volume", "a volume read from DICOM", f"a volume from {self.source!r}")
        assert self.datasets is not None
        return tuple(str(ds.SOPInstanceUID) for ds in self.datasets)

    @property
    def frame_of_reference_uid(self) -> str | None:
        """FrameOfReferenceUID shared by all slices, or ``None`` without DICOM sources."""
        return None if self.datasets is None else str(self.datasets[0].FrameOfReferenceUID)

    def slice_positions(self) -> np.ndarray:
        """``(Z, 3)`` LPS position (mm) of the first pixel's centre of each slice."""
        k = np.arange(self.shape[0], dtype=np.float64)
        return self.affine[:3, 3][None, :] + k[:, None] * self.affine[:3, 2][None, :]

    def voxel_to_patient(self, index_zyx: np.ndarray) -> np.ndarray:
        """LPS mm of voxel centres given as ``(..., 3)`` (slice, row, column) indices."""
        idx = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_voxel(self, points_lps: np.ndarray) -> np.ndarray:
        """Fractional (slice, row, column) indices of ``(..., 3)`` LPS points (mm)."""
        inv = np.linalg.inv(self.affine)
        pts = np.asarray(points_lps, dtype=np.float64)
        return (pts @ inv[:3, :3].T + inv[:3, 3])[..., ::-1]

    def with_pixels(self, pixels: np.ndarray) -> Volume:
        """The same geometry and sources with new ``(Z, H, W)`` pixels (e.g. a reconstruction)."""
        arr = np.asarray(pixels)
        expect(
            arr.shape == self.pixels.shape,
            "pixels",
            f"shape {self.pixels.shape} (the volume's grid)",
            f"shape {arr.shape}",
        )
        return Volume(arr, self.affine, self.datasets, self.source, self.notes)

    def select(self, slices: Sequence[int] | slice) -> Volume:
        """A sub-volume of some slices (e.g. one slice: ``vol.select([k])``), geometry kept."""
        idx = np.arange(self.shape[0])[slices] if isinstance(slices, slice) else np.asarray(slices)
        idx = np.atleast_1d(idx).astype(int)
        expect(
            idx.size >= 1 and bool(np.all((idx >= 0) & (idx < self.shape[0]))),
            "slices",
            f"indices in [0, {self.shape[0]})",
            idx.tolist(),
        )
        steps = np.diff(idx)
        expect(
            idx.size == 1 or bool(np.all(steps == steps[0])) and steps[0] > 0,
            "slices",
            "increasing, evenly stepped indices (a regular grid)",
            idx.tolist(),
        )
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, 3] + idx[0] * self.affine[:3, 2]
        if idx.size > 1:
            affine[:3, 2] = self.affine[:3, 2] * int(steps[0])
        datasets = None if self.datasets is None else tuple(self.datasets[i] for i in idx)
        return Volume(self.pixels[idx], affine, datasets, self.source, self.notes)
