"""JSON outputs: one writer (atomic, non-finite floats as null) and the package versions every
summary records."""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from klip_med._atomic import atomic_path

VERSIONED_PACKAGES = ("klip-med", "torch", "deepinv", "monai", "pydicom", "highdicom", "nibabel", "numpy")


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages that shape the numbers."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out



def jsonable(value: Any) -> Any:
    """Non-finite floats become None (an unbounded window edge, as in ``KLIPSettings.describe``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (atomic; non-finite floats written as null)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path
