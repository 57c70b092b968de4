"""Data manifests: which files, which slices, which split, with checksums.

A manifest is a small versioned JSON file (schema ``klip-med-manifest``, version 1)::

    {
      "schema": "klip-med-manifest",
      "version": 1,
      "name": "lgg-flair-128",
      "modality": "MR",                 # "MR" or "CT"
      "description": "...",
      "licence": "CC BY-NC-SA 4.0 ...",
      "array_key": "flair",             # the npz array holding slices (S, H, W)
      "mask_key": "mask",               # optional npz array of lesion masks (S, H, W)
      "items": [
        {"file": "lgg_flair_128/TCGA_CS_4942_19970222.npz",   # relative to the data root
         "sha256": "<64 hex>",
         "split": "train",              # train | dev | test
         "slices": [0, 1, 2],           # or "all", or {"start": a, "stop": b}
         "labels": {"patient": "TCGA_CS_4942", "lesion_slices": [7, 8]}},
        ...
      ]
    }

:func:`read_manifest` validates everything a training or benchmark run relies on before it
starts: known keys only, the data root exists, every file lies inside it (no ``..`` or absolute
paths, no symlink escaping it), exists, and matches its SHA-256. Any failure raises
:class:`~klip_med.errors.KLIPMedError` naming the manifest, the item and the rule.

The data root is passed explicitly, or taken from the ``KLIP_MED_DATA_ROOT`` environment variable.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klip_med.errors import KLIPMedError, check_keys

SCHEMA = "klip-med-manifest"
VERSION = 1
DATA_ROOT_ENV = "KLIP_MED_DATA_ROOT"
SPLITS = ("train", "dev", "test")
MODALITIES = ("MR", "CT")

_TOP_KEYS = {"schema", "version", "name", "modality", "description", "licence", "array_key", "mask_key",
             "items", "notes", "spacing_key", "created_by"}
_REQUIRED_TOP = {"schema", "version", "name", "modality", "array_key", "items"}
_ITEM_KEYS = {"file", "sha256", "split", "slices", "labels"}
_REQUIRED_ITEM = {"file", "sha256", "split", "slices"}


@dataclass(frozen=True)
class ManifestItem:
    """One file of a manifest with the slices it contributes.

    Attributes:
        path: absolute path of the file (inside the data root, checksum verified).
        relative: the path as written in the manifest.
        split: ``train``, ``dev`` or ``test``.
        slices: the slice spec: ``"all"``, a tuple of indices, or ``(start, stop)`` as a ``range``.
        labels: free-form labels (patient id, lesion slice list, ...).
        sha256: the file's checksum as listed (verified unless the reader was told not to).
    """

    path: Path
    relative: str
    split: str
    slices: str | tuple[int, ...] | range
    labels: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    def slice_indices(self, n_slices: int) -> list[int]:
        """The slice indices into an array of ``n_slices`` slices; raises if any is out of range."""
        if self.slices == "all":
            return list(range(n_slices))
        idx = list(self.slices)
        bad = [i for i in idx if not 0 <= i < n_slices]
        if bad:
            raise KLIPMedError(
                f"{self.relative}: slices: expected indices in [0, {n_slices}), found {bad[:5]}"
            )
        return idx


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``source`` is the manifest file, ``root`` the data root."""

    source: Path
    root: Path
    name: str
    modality: str
    array_key: str
    mask_key: str | None
    items: tuple[ManifestItem, ...]
    description: str = ""
    licence: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def split(self, name: str) -> tuple[ManifestItem, ...]:
        """Items of one split (``train``, ``dev`` or ``test``)."""
        if name not in SPLITS:
            raise KLIPMedError(f"split: expected one of {', '.join(SPLITS)}, found {name!r}")
        return tuple(item for item in self.items if item.split == name)

    def sha256(self) -> str:
        """SHA-256 of the manifest file's bytes (recorded in a trained prior's config)."""
        return file_sha256(self.source)

    def load_slices(self, split: str, with_masks: bool = False) -> tuple[np.ndarray, np.ndarray | None, list]:
        """Stack the slices of one split.

        Returns:
            images: (N, H, W) in the file's dtype (uint8 FLAIR, int16 HU, ...).
            masks: (N, H, W) bool if ``with_masks`` (needs ``mask_key``), else None.
            keys: N tuples ``(relative file, slice index)``, for provenance.
        """
        if with_masks and self.mask_key is None:
            raise KLIPMedError(f"{self.source}: mask_key: expected one for with_masks=True, found none")
        images, masks, keys = [], [], []
        for item in self.split(split):
            with np.load(item.path) as data:
                if self.array_key not in data:
                    raise KLIPMedError(
                        f"{item.path}: expected an array named {self.array_key!r}, found {sorted(data)}"
                    )
                arr = data[self.array_key]
                idx = item.slice_indices(arr.shape[0])
                images.append(arr[idx])
                if with_masks:
                    masks.append(data[self.mask_key][idx].astype(bool))
                keys.extend((item.relative, i) for i in idx)
        if not images:
            raise KLIPMedError(f"{self.source}: split {split!r}: expected at least one item, found none")
        stacked = np.concatenate(images)
        return stacked, (np.concatenate(masks) if with_masks else None), keys


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_data_root(data_root: str | Path | None) -> Path:
    """The data root: the argument, else ``$KLIP_MED_DATA_ROOT``; must be an existing folder."""
    if data_root is None:
        data_root = os.environ.get(DATA_ROOT_ENV)
    if data_root is None:
        raise KLIPMedError(
            f"data root: expected --data-root or the {DATA_ROOT_ENV} environment variable "
            "(e.g. ../shared/data), found neither"
        )
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise KLIPMedError(f"data root: expected an existing folder, found {str(data_root)!r}")
    return root


def _parse_slices(where: str, spec: Any) -> str | tuple[int, ...] | range:
    if spec == "all":
        return "all"
    if isinstance(spec, dict):
        if set(spec) != {"start", "stop"} or not all(isinstance(spec[k], int) for k in spec):
            raise KLIPMedError(f"{where}: slices: expected {{'start': int, 'stop': int}}, found {spec!r}")
        if not 0 <= spec["start"] < spec["stop"]:
            raise KLIPMedError(f"{where}: slices: expected 0 <= start < stop, found {spec!r}")
        return range(spec["start"], spec["stop"])
    if isinstance(spec, list) and spec and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return tuple(spec)
    raise KLIPMedError(
        f"{where}: slices: expected \"all\", a non-empty list of integers or {{'start', 'stop'}}, "
        f"found {spec!r}"
    )


def _inside_root(root: Path, where: str, relative: Any) -> Path:
    if not isinstance(relative, str) or not relative:
        raise KLIPMedError(f"{where}: file: expected a relative path string, found {relative!r}")
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise KLIPMedError(
            f"{where}: file: expected a path inside the data root {root}, found {relative!r} "
            "(absolute paths and '..' are refused)"
        )
    path = (root / rel).resolve()
    if root != path and root not in path.parents:
        raise KLIPMedError(f"{where}: file: expected a path inside the data root {root}, found {path}")
    if not path.is_file():
        raise KLIPMedError(f"{where}: file: expected an existing file under {root}, found none at {relative!r}")
    return path


def read_manifest(manifest: str | Path, data_root: str | Path | None = None,
                  verify_checksums: bool = True) -> Manifest:
    """Read and validate a manifest.

    Args:
        manifest: path of the JSON file.
        data_root: folder the item paths are relative to; default ``$KLIP_MED_DATA_ROOT``.
        verify_checksums: compare every file's SHA-256 with the manifest (on by default).

    Raises:
        KLIPMedError: unknown or missing keys, wrong schema/version, a bad split or slice spec,
            a file outside the root or missing, a checksum mismatch.
    """
    source = Path(manifest)
    if not source.is_file():
        raise KLIPMedError(f"manifest: expected an existing JSON file, found none at {str(manifest)!r}")
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KLIPMedError(f"{source}: expected valid JSON, found a parse error: {exc}") from None
    if not isinstance(raw, dict):
        raise KLIPMedError(f"{source}: expected a JSON object, found {type(raw).__name__}")
    check_keys(raw, str(source), _TOP_KEYS, _REQUIRED_TOP)
    if raw["schema"] != SCHEMA or raw["version"] != VERSION:
        raise KLIPMedError(
            f"{source}: expected schema {SCHEMA!r} version {VERSION}, "
            f"found {raw['schema']!r} version {raw['version']!r}"
        )
    if raw["modality"] not in MODALITIES:
        raise KLIPMedError(f"{source}: modality: expected one of {MODALITIES}, found {raw['modality']!r}")
    if not isinstance(raw["items"], list) or not raw["items"]:
        raise KLIPMedError(f"{source}: items: expected a non-empty list, found {raw['items']!r:.60}")
    root = resolve_data_root(data_root)
    items = []
    for n, entry in enumerate(raw["items"]):
        where = f"{source}: items[{n}]"
        if not isinstance(entry, dict):
            raise KLIPMedError(f"{where}: expected an object, found {entry!r:.60}")
        check_keys(entry, where, _ITEM_KEYS, _REQUIRED_ITEM)
        if entry["split"] not in SPLITS:
            raise KLIPMedError(f"{where}: split: expected one of {SPLITS}, found {entry['split']!r}")
        path = _inside_root(root, where, entry["file"])
        checksum = entry["sha256"]
        if not (isinstance(checksum, str) and len(checksum) == 64):
            raise KLIPMedError(f"{where}: sha256: expected 64 hex characters, found {checksum!r}")
        if verify_checksums:
            actual = file_sha256(path)
            if actual != checksum.lower():
                raise KLIPMedError(
                    f"{where}: {entry['file']}: expected sha256 {checksum}, found {actual} "
                    "(the file changed since the manifest was written)"
                )
        labels = entry.get("labels", {})
        if not isinstance(labels, dict):
            raise KLIPMedError(f"{where}: labels: expected an object, found {labels!r:.60}")
        items.append(ManifestItem(path, entry["file"], entry["split"],
                                  _parse_slices(where, entry["slices"]), dict(labels), checksum.lower()))
    return Manifest(
        source=source.resolve(), root=root, name=str(raw["name"]), modality=raw["modality"],
        array_key=str(raw["array_key"]), mask_key=raw.get("mask_key"), items=tuple(items),
        description=str(raw.get("description", "")), licence=str(raw.get("licence", "")), raw=raw,
    )
