"""Slice orientation for the MONAI transforms: which flips / transpose bring a stored slice into
the orientation a prior was trained on, and back.

A prior was trained on slices shown one way (the shipped priors: rows run anterior to posterior,
columns patient right to left, the radiological display of an axial slice,
``PRIOR_SLICE_AXCODES = "PL"``). ``Orientationd(axcodes="RAS")`` stores the same slice rotated by
180 degrees, so when the input carries an affine, each slice is flipped / transposed (exactly, no
interpolation) into the prior's orientation before sampling and back afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from klip_med.errors import expect

PRIOR_SLICE_AXCODES = "PL"
"""Where the shipped priors' image rows and columns point: rows to Posterior, columns to patient Left."""

OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel: (negative, positive) per world axis
LPS_LABELS = (("R", "L"), ("A", "P"), ("I", "S"))


@dataclass(frozen=True)
class SliceLayout:
    """Flips / transpose that bring stored slices ``(..., H, W)`` into the prior's orientation."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    note: str = "slices used as stored (rows = first spatial axis)"
    matched: bool = True

    def to_prior(self, x: np.ndarray) -> np.ndarray:
        if self.transpose:
            x = np.swapaxes(x, -1, -2)
        if self.flip_rows:
            x = np.flip(x, -2)
        if self.flip_cols:
            x = np.flip(x, -1)
        return np.ascontiguousarray(x)

    def from_prior(self, x: np.ndarray) -> np.ndarray:
        if self.flip_cols:
            x = np.flip(x, -1)
        if self.flip_rows:
            x = np.flip(x, -2)
        if self.transpose:
            x = np.swapaxes(x, -1, -2)
        return np.ascontiguousarray(x)

    def describe(self) -> dict[str, Any]:
        return {"transpose": self.transpose, "flip_rows": self.flip_rows, "flip_cols": self.flip_cols,
                "note": self.note}


def slice_layout(affine: np.ndarray, space: str, target: str) -> SliceLayout:
    """The layout that points slice rows / columns to ``target`` (e.g. ``"PL"``) for this affine.

    Args:
        affine: (N+1, N+1) voxel to world (mm), N = 2 or 3 spatial axes.
        space: ``"RAS"`` or ``"LPS"``, the world the affine maps to (MONAI's ``meta["space"]``).
        target: two axis codes, rows then columns.
    """
    labels = LPS_LABELS if str(space).upper() == "LPS" else RAS_LABELS
    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64), labels=labels)
    c0, c1 = (codes + (None, None))[:2]
    rows, cols = target[0], target[1]
    pair_rows, pair_cols = {rows, OPPOSITE[rows]}, {cols, OPPOSITE[cols]}
    if c0 in pair_rows and c1 in pair_cols:
        transpose, row_code, col_code = False, c0, c1
    elif c1 in pair_rows and c0 in pair_cols:
        transpose, row_code, col_code = True, c1, c0
    else:
        note = f"slice axes point {c0}{c1}, not along {target}: used as stored"
        return SliceLayout(note=note, matched=False)
    return SliceLayout(transpose, row_code != rows, col_code != cols,
                        note=f"slice axes {c0}{c1} ({space}) shown to the prior as {target}")


def check_axcodes(slice_axcodes: str | None) -> str | None:
    """``slice_axcodes`` upper-cased, or None; :class:`KLIPMedError` unless two codes on different axes."""
    if slice_axcodes is None:
        return None
    codes = str(slice_axcodes).upper()
    ok = len(codes) == 2 and all(c in OPPOSITE for c in codes) and codes[1] not in (codes[0], OPPOSITE[codes[0]])
    expect(ok, "slice_axcodes", "two axis codes on different axes, e.g. 'PL', or None", slice_axcodes)
    return codes
