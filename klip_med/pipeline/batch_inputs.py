"""What ``klip-med batch`` reads: a list of inputs or a data manifest, each input with a stable
output folder name, a cheap signature of its files, and the :class:`~klip_med.io.inputs.RunInput`
it becomes.

A list is a text file with one input per line, each what ``klip-med run --input`` takes: a DICOM
folder or file, a ``.nii`` / ``.nii.gz``, an ``.npz`` (relative paths are relative to the list's
folder), or a URL (``scheme://...``, passed to :func:`klip_med.io.inputs.read_input` as written,
e.g. a DICOMweb series). Blank lines and lines starting with ``#`` are skipped; an input listed
twice is refused.

A data manifest (a ``.json`` file, :mod:`klip_med.data.manifest`) gives one input per item: the
item's slices of its file (key ``array_key``, physical units), with ``mask_key`` as the truth mask,
``pixel_spacing_mm`` / ``z_mm`` from the file when present (else 1 mm), and for MR priors the
per-volume MR scale computed over the whole file, as training and ``klip-med eval`` do.

Names: ``<stem>-<8 hex>``, the stem from the file, folder or URL, the hex from the input as written
(a path normalised, a URL as is, a manifest item's name, file, split and slices). A name does not
depend on the other lines or their order, so a list can grow and a rerun finds its outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klip_med.data.manifest import SCHEMA, ManifestItem, read_manifest
from klip_med.errors import KLIPMedError, expect
from klip_med.io.inputs import RunInput, read_input
from klip_med.io.volume import Volume

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SUFFIXES = (".nii.gz", ".nii", ".npz", ".dcm")


@dataclass(frozen=True)
class ManifestSource:
    """A manifest item and what the manifest says about its file."""

    item: ManifestItem
    manifest: str
    array_key: str
    mask_key: str | None
    modality: str


@dataclass(frozen=True)
class BatchInput:
    """One input of a batch.

    Attributes:
        name: its output folder ``DIR/<name>/``.
        source: as the user wrote it (a list line, or ``manifest:file[split]``), for the index.
        location: the resolved path or the URL.
        manifest: set for a manifest item.
    """

    name: str
    source: str
    location: str
    manifest: ManifestSource | None = field(default=None, repr=False)


def stable_name(stem: str, identity: str) -> str:
    """``<stem>-<8 hex>``: the stem made filesystem-safe (60 characters at most), the hex from ``identity``."""
    for suffix in SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:60] or "input"
    return f"{safe}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def read_batch_inputs(path: str | Path, data_root: str | Path | None = None,
                      split: str | None = None) -> list[BatchInput]:
    """The inputs of a list file or a data manifest (``.json``); see the module docstring.

    Args:
        data_root, split: manifests only: the folder its files are relative to (default
            ``$KLIP_MED_DATA_ROOT``) and which split to take (default all items).
    """
    p = Path(path)
    expect(p.is_file(), "--inputs", "a text file with one input per line, or a data manifest (.json)",
           f"no such file {str(p)!r}")
    if p.suffix.lower() == ".json":
        return _manifest_inputs(p, data_root, split)
    expect(split is None and data_root is None, "--split / --data-root", "only with a data manifest (.json)",
           f"a list file {str(p)!r}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise KLIPMedError(f"--inputs {p}: expected a UTF-8 text file, found {exc}") from None
    inputs: list[BatchInput] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if URL.match(text):
            location, identity, stem = text, text, text.rstrip("/").rsplit("/", 1)[-1]
        else:
            written = Path(os.path.normpath(text))
            location = str((written if written.is_absolute() else p.parent / written).resolve())
            identity, stem = str(written), written.name
        expect(location not in seen, f"--inputs {p} line {number}", "each input once",
               f"{text!r}, already on line {seen.get(location)}")
        seen[location] = number
        inputs.append(BatchInput(stable_name(stem, identity), text, location))
    expect(bool(inputs), f"--inputs {p}", "at least one input line", "none (only blank or # lines)")
    return inputs


def _manifest_inputs(path: Path, data_root, split: str | None) -> list[BatchInput]:
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise KLIPMedError(f"--inputs {path}: expected valid JSON (a data manifest), found {exc}") from None
    expect(isinstance(head, dict) and head.get("schema") == SCHEMA, f"--inputs {path}",
           f"a data manifest (schema {SCHEMA!r}) or a list file (not .json)",
           f"JSON with schema {head.get('schema') if isinstance(head, dict) else None!r}")
    manifest = read_manifest(path, data_root)
    items = manifest.split(split) if split is not None else manifest.items
    expect(bool(items), f"--inputs {path}", f"items in split {split!r}", "none")
    inputs = []
    for item in items:
        slices = item.slices if isinstance(item.slices, str) else list(item.slices)
        identity = json.dumps([manifest.name, item.relative, item.split, slices])
        stem = str(item.labels.get("patient", Path(item.relative).name))
        source = ManifestSource(item, manifest.name, manifest.array_key, manifest.mask_key, manifest.modality)
        inputs.append(BatchInput(stable_name(stem, identity), f"{manifest.name}:{item.relative}[{item.split}]",
                                 str(item.path), source))
    return inputs


def input_signature(inp: BatchInput) -> dict[str, Any]:
    """What identifies the input's content without reading it: a manifest item's file checksum and
    slices; a file's size and modification time; a folder's (name, size, mtime) list, hashed; a URL."""
    if inp.manifest is not None:
        item = inp.manifest.item
        return {"file": item.relative, "sha256": item.sha256,
                "slices": item.slices if isinstance(item.slices, str) else list(item.slices)}
    if URL.match(inp.location):
        return {"url": inp.location}
    p = Path(inp.location)
    if p.is_file():
        stat = p.stat()
        return {"path": inp.location, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if p.is_dir():
        digest = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            stat = f.stat()
            digest.update(f"{f.relative_to(p)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return {"path": inp.location, "files_sha256": digest.hexdigest()}
    return {"path": inp.location, "missing": True}


def load_input(inp: BatchInput, prior, dicomweb=None) -> RunInput:
    """The input as ``klip-med run`` reads it (:func:`klip_med.io.inputs.read_input`, a URL with the
    ``dicomweb`` options), or a manifest item."""
    if inp.manifest is None:
        return read_input(inp.location, dicomweb)
    return _manifest_run_input(inp.manifest, prior)


def _manifest_run_input(source: ManifestSource, prior) -> RunInput:
    item = source.item
    try:
        with np.load(item.path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except Exception as exc:
        raise KLIPMedError(f"{item.path}: expected a readable .npz file, found {type(exc).__name__}: {exc}") from exc
    expect(source.array_key in arrays, str(item.path), f"an array named {source.array_key!r} (the manifest's "
           "array_key)", f"keys {sorted(arrays)}")
    volume = arrays[source.array_key].astype(np.float32)
    expect(volume.ndim == 3, f"{item.path}: {source.array_key}", "(S, H, W) slices", f"shape {volume.shape}")
    idx = item.slice_indices(volume.shape[0])
    spacing = np.asarray(arrays.get("pixel_spacing_mm", 1.0), dtype=np.float64).reshape(-1)
    dz = 1.0
    if "z_mm" in arrays and len(idx) > 1:
        dz = float(np.median(np.abs(np.diff(np.asarray(arrays["z_mm"], dtype=np.float64)[idx])))) or 1.0
    mask = None
    if source.mask_key is not None:
        expect(source.mask_key in arrays, str(item.path), f"an array named {source.mask_key!r} (mask_key)",
               f"keys {sorted(arrays)}")
        mask = arrays[source.mask_key][idx].astype(bool)
    rule = prior.config.intensity
    scale = rule.mr_scale(volume) if rule.kind == "mr-percentile" else None  # the whole patient volume
    where = f"{source.manifest}:{item.relative}"
    grid = Volume(volume[idx], np.diag([float(spacing[-1]), float(spacing[0]), dz, 1.0]), None, where)
    return RunInput(grid, source.modality, "manifest", mask, scale, where,
                    extra={"manifest": {"name": source.manifest, "file": item.relative, "split": item.split,
                                        "slices": [int(i) for i in idx], "labels": item.labels}})
