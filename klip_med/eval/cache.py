"""The benchmark's per-slice cache: one compressed npz per slice, written atomically.

A file holds everything the metrics need, so block size, windows and image statistics can be
re-chosen later without sampling again:

- ``maps``: (M, H, W) float32 per-pixel maps of the M methods (names in ``meta["methods"]``);
- ``lesion``, ``body_mask``: (H, W) bool;
- ``images``: (4, H, W) float16 ground truth, baseline reconstruction, posterior mean and std
  (prior units), for figures;
- ``meta``: a JSON string: key, patient, label, selection info, the cache fingerprint, and per
  method its extra network forwards, seconds, native image score and details.

A file is reused only when its fingerprint matches the run's (same slice content, physics,
settings, baselines and prior weights); otherwise the slice is computed again and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klip_med._atomic import atomic_path
from klip_med.errors import KLIPMedError


@dataclass
class CachedSlice:
    """One slice as stored (see the module docstring for the arrays)."""

    key: str
    patient: str
    label: int
    maps: dict[str, np.ndarray]
    lesion: np.ndarray
    body_mask: np.ndarray
    images: np.ndarray
    meta: dict


def slice_path(folder: Path, key: str) -> Path:
    """File of a slice: its key with anything but letters, digits, ``._-+`` replaced, plus a short hash."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", key).strip("_")[-80:]
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return Path(folder) / f"{stem}.{digest}.npz"


def fingerprint(parts: dict, arrays: tuple[np.ndarray, ...] = ()) -> str:
    """SHA-256 of a JSON-able description plus the bytes of some arrays."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8"))
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str((a.dtype.str, a.shape)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def write_slice(path: Path, entry: CachedSlice) -> Path:
    """Write one slice atomically (temporary file, then rename)."""
    names = list(entry.maps)
    maps = np.stack([np.asarray(entry.maps[n], dtype=np.float32) for n in names]) if names else np.zeros((0, 1, 1))
    meta = {**entry.meta, "key": entry.key, "patient": entry.patient, "label": int(entry.label), "methods": names}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, maps=maps, lesion=entry.lesion.astype(bool), body_mask=entry.body_mask.astype(bool),
                            images=entry.images.astype(np.float16), meta=np.array(json.dumps(meta)))
    return path


def read_slice(path: Path) -> CachedSlice:
    """Read one slice file; raises :class:`KLIPMedError` for a damaged one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            maps = data["maps"]
            entry = CachedSlice(meta["key"], meta["patient"], int(meta["label"]),
                                {n: maps[i] for i, n in enumerate(meta["methods"])},
                                data["lesion"], data["body_mask"], data["images"], meta)
    except (OSError, KeyError, ValueError) as exc:
        raise KLIPMedError(f"{path}: expected a benchmark slice cache file, found an unreadable one ({exc}); "
                           "delete it to recompute the slice") from None
    return entry


def cached_fingerprint(path: Path) -> str | None:
    """The fingerprint stored in a slice file, or None if the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"])).get("fingerprint")
    except (OSError, KeyError, ValueError):
        return None

def with_current_body_mask(entry: CachedSlice) -> CachedSlice:
    """``entry`` with its body mask recomputed from its cached posterior mean by today's
    :func:`klip_med.data.masks.body_mask` (cached maps stay valid when the mask rule improves; the
    mask comes from the float16 copy, so fresh and cached slices get the same one)."""
    from dataclasses import replace

    from klip_med.data.masks import body_mask

    mean = np.asarray(entry.images[2], dtype=np.float16).astype(np.float32)
    return replace(entry, body_mask=np.asarray(body_mask(mean), dtype=bool))


def run_slices(run_dir: str | Path, current_mask: bool = True) -> list[CachedSlice]:
    """The cached slices of one ``klip-med eval --out`` run, in file-name order.

    The run's own slices are those its ``results.json`` lists: a ``slices/`` folder may be shared
    by several runs (e.g. the healthy twins of several shift kinds, linked to one folder), so
    globbing it would mix in other runs' images. Without a ``results.json`` (a run still in
    progress) every file of the folder is read.

    Args:
        run_dir: the eval run's ``--out`` folder.
        current_mask: recompute each body mask by today's rule (:func:`with_current_body_mask`).
    """
    folder = Path(run_dir) / "slices"
    results = Path(run_dir) / "results.json"
    if results.is_file():
        try:
            keys = [s["key"] for s in json.loads(results.read_text(encoding="utf-8"))["slices"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise KLIPMedError(f"{results}: expected a klip-med eval results file with a 'slices' list, "
                               f"found an unreadable one ({exc})") from None
        paths = sorted(slice_path(folder, k) for k in keys)
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise KLIPMedError(f"{folder}: expected the {len(paths)} cached slices {results.name} lists, "
                               f"found {len(missing)} missing (e.g. {missing[0]}); rerun the eval to recompute them")
    else:
        paths = sorted(folder.glob("*.npz"))
    entries = [read_slice(p) for p in paths]
    return [with_current_body_mask(e) for e in entries] if current_mask else entries
