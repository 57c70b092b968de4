"""The DICOM part of the output set: derived series, Parametric Map, SEG and Secondary Capture
on the source series, each written atomically (a series as a whole folder swapped in)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from klip_med.io.volume import Volume


def _write_single_sc(source: Volume, heat: np.ndarray, path: Path) -> Path:
    """The one Secondary Capture of a one-slice volume, saved as ``path`` (atomic)."""
    from klip_med.io.dicom.secondary_capture import write_secondary_captures

    with tempfile.TemporaryDirectory(prefix=".klip_sc.", dir=path.parent) as tmp:
        (written,) = write_secondary_captures(source, heat, Path(tmp) / "sc")
        os.replace(written, path)
    return path


def _swap_in(fresh: Path, final: Path) -> None:
    """Replace folder ``final`` by the complete folder ``fresh`` (two renames; never a mix)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(fresh, final)
    if old.exists():
        shutil.rmtree(old)


def write_series_folder(folder: Path, name: str, write) -> list[str]:
    """Write a series with ``write(tmp_folder)`` next to ``folder / name``, then swap it in whole.

    Returns the written file names relative to ``folder``'s parent (e.g. ``dicom/recon/<uid>.dcm``).
    """
    fresh = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    try:
        paths = write(fresh / "series")
        _swap_in(fresh / "series", folder / name)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return [str(Path(folder.name) / name / p.name) for p in paths]


def write_dicom_outputs(folder: Path, source: Volume, recon: np.ndarray, klip: np.ndarray,
                        mask: np.ndarray) -> dict[str, Any]:
    """``recon/``, ``klip_pm.dcm``, ``klip_seg.dcm``, ``klip_sc.dcm`` (or ``klip_sc/``) on ``source``.

    Args:
        recon: ``(Z, H, W)`` physical units on the source grid; ``klip``: nats per source pixel;
        mask: bool OOD mask (an empty mask writes no SEG; the summary says so).
    """
    from klip_med.io.dicom.parametric_map import write_parametric_map
    from klip_med.io.dicom.secondary_capture import write_secondary_captures
    from klip_med.io.dicom.seg import write_seg
    from klip_med.io.dicom.series import write_derived_series

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    # a rerun replaces a previous series (new UIDs) as a whole, never mixes the two
    files["recon_series"] = write_series_folder(folder, "recon", lambda f: write_derived_series(source, recon, f))
    files["parametric_map"] = str(write_parametric_map(source, klip, folder / "klip_pm.dcm")
                                  .relative_to(folder.parent))
    if bool(mask.any()):
        files["seg"] = str(write_seg(source, mask, folder / "klip_seg.dcm").relative_to(folder.parent))
    else:
        files["seg"] = None
    if source.shape[0] == 1:
        files["secondary_capture"] = str(_write_single_sc(source, klip, folder / "klip_sc.dcm")
                                         .relative_to(folder.parent))
    else:
        files["secondary_capture"] = write_series_folder(
            folder, "klip_sc", lambda f: write_secondary_captures(source, klip, f))
    return files
