"""Which image is which: a digest of a slice's pixels and its manifest key, so that a null model can
recognise its own calibration images among the images it is asked to score."""

from __future__ import annotations

import hashlib

import numpy as np


def slice_sha256(pixels) -> str:
    """SHA-256 of a slice's pixels in physical units (HU / MR signal) as float32, shape included.

    The same slice read from a manifest's ``.npz``, a NIfTI or a DICOM series gives the same digest
    when its values are the same (the stored integers become the same float32 numbers).
    """
    a = np.ascontiguousarray(np.asarray(pixels), dtype=np.float32)
    digest = hashlib.sha256(("x".join(str(n) for n in a.shape)).encode())
    digest.update(a.tobytes())
    return digest.hexdigest()


def manifest_key(manifest_name: str, relative_file: str, index: int) -> str:
    """``"<manifest>:<file>[<slice>]"``: a slice of a manifest item, as null models record it."""
    return f"{manifest_name}:{relative_file}[{int(index)}]"
