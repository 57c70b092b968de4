"""Atomic file writes: a temporary file in the destination folder, then ``os.replace``.

An interrupted run leaves either the old file or the complete new one, never half a DICOM.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from klip_med.errors import expect


def _suffix(path: Path) -> str:
    """Keep compound suffixes such as ``.nii.gz`` (writers pick the format from them)."""
    suffixes = path.suffixes
    return "".join(suffixes[-2:]) if suffixes[-2:] == [".nii", ".gz"] else path.suffix


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path`` atomically.

    The parent folder must exist. On any exception the temporary file is removed and ``path`` is
    left as it was.

    Example::

        with atomic_path(out / "seg.dcm") as tmp:
            dataset.save_as(tmp)
    """
    target = Path(path)
    expect(
        target.parent.is_dir(), str(target), "an existing output folder", f"no folder {target.parent}"
    )
    expect(not target.is_dir(), str(target), "a file path", "an existing folder")
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{_suffix(target)}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
