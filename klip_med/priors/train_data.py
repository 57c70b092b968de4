"""Training images for ``klip-med train``: a manifest's ``train`` split in the prior's [-1, 1] range,
and the compact *training pack* that carries the same images to a machine without the data.

A pack is one ``.npz`` file (a zip, LZMA-compressed; ``numpy.load`` reads it) holding the training
slices in their stored dtype (uint8 FLAIR, HU as int16 clipped to the CT window), the MR scale of
each slice's volume, and a JSON header with the intensity rule, the manifest's provenance and the
SHA-256 of the decoded float32 images. Decoding a pack runs the same code as decoding the
manifest, and the reader checks that digest: a pack gives bit-identical training images or an
error. The LGG FLAIR train split (1,172 slices) packs into about 7.6 MB, the L067 CT train split
(400 slices) into about 3.3 MB.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from klip_med._atomic import atomic_path
from klip_med.data.manifest import Manifest, file_sha256
from klip_med.errors import KLIPMedError
from klip_med.priors.intensity import ABDOMEN_WINDOW, IntensityRule

PACK_FORMAT = "klip-med-train-pack"
PACK_VERSION = 1


@dataclass
class TrainData:
    """Training images in the prior's range, (N, 1, H, W) float32, and the rule that made them."""

    images: Tensor
    intensity: IntensityRule
    provenance: dict[str, Any] = field(default_factory=dict)
    modality: str = "MR"


@dataclass
class _Codes:
    """The stored slices before the intensity rule: ``codes`` (N, H, W) in the file's dtype, the MR
    multiplier of each slice's volume (``scales``, None for CT), the rule and the provenance."""

    codes: np.ndarray
    scales: np.ndarray | None
    rule: IntensityRule
    provenance: dict[str, Any]


def _manifest_codes(manifest: Manifest, mr_percentile: float) -> _Codes:
    """Read the ``train`` split. CT: HU, clipped to the abdominal window when that is exact (integer
    HU and an integer window; the rule clips anyway). MR: each file (a patient's volume) gets the
    multiplier that brings its percentile of non-zero voxels (over all its slices) to a reference
    equal to the median of that percentile over the training volumes."""
    items = manifest.split("train")
    if not items:
        raise KLIPMedError(f"{manifest.source}: expected a 'train' split, found none")
    scales = None
    if manifest.modality == "CT":
        codes, _, _ = manifest.load_slices("train")
        rule = ABDOMEN_WINDOW
        lo, hi = rule.hu_min, rule.hu_max
        if np.issubdtype(codes.dtype, np.integer) and float(lo).is_integer() and float(hi).is_integer():
            codes = np.clip(codes, int(lo), int(hi)).astype(codes.dtype)
    else:
        volumes, selections = [], []
        for item in items:
            with np.load(item.path) as data:
                volume = data[manifest.array_key]
            volumes.append(volume)
            selections.append(item.slice_indices(volume.shape[0]))
        floats = [v.astype(np.float32) for v in volumes]
        levels = [float(np.percentile(v[v > 0], mr_percentile)) for v in floats]
        peak = 255.0 if all(v.max() <= 255 for v in floats) else max(float(v.max()) for v in floats)
        reference = float(np.clip(np.median(levels) / peak, 1e-3, 1.0))
        rule = IntensityRule("mr-percentile", percentile=mr_percentile, reference=round(reference, 4))
        codes = np.concatenate([v[idx] for v, idx in zip(volumes, selections, strict=True)])
        scales = np.concatenate([np.full(len(idx), rule.mr_scale(v.astype(np.float32)), dtype=np.float64)
                                 for v, idx in zip(volumes, selections, strict=True)])
    if codes.ndim != 3 or codes.shape[1] != codes.shape[2]:
        raise KLIPMedError(f"{manifest.source}: expected square slices (N, H, H), found {codes.shape}")
    provenance = {
        "manifest": manifest.name,
        "manifest_file": manifest.source.name,
        "manifest_sha256": manifest.sha256(),
        "split": "train",
        "n_slices": int(codes.shape[0]),
        "files": sorted({(item.relative, item.sha256) for item in items}),
        "licence": manifest.licence,
    }
    return _Codes(codes, scales, rule, provenance)


def _decode(codes: _Codes) -> np.ndarray:
    """(N, H, W) float32 in [-1, 1]: the rule applied slice by slice (elementwise, so the same
    values as applying it to whole volumes)."""
    if codes.scales is None:
        return codes.rule.to_model(codes.codes)
    return np.stack([codes.rule.to_model(s, float(k)) for s, k in zip(codes.codes, codes.scales, strict=True)])


def _images_sha256(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes()).hexdigest()


def prepare_training_data(manifest: Manifest, settings) -> TrainData:
    """Load the manifest's ``train`` split and map it to [-1, 1] by the modality's rule.

    CT: the abdominal window (W400/L40). MR: each file (a patient's volume) is scaled by its own
    percentile of non-zero voxels (over all its slices), to a reference equal to the median of that
    percentile over the training volumes, so typical training volumes keep their published scale.
    ``settings`` is a :class:`~klip_med.priors.train.TrainSettings` (its ``mr_percentile``).
    """
    codes = _manifest_codes(manifest, settings.mr_percentile)
    return TrainData(torch.from_numpy(_decode(codes)[:, None].copy()), codes.rule, codes.provenance,
                     manifest.modality)


def write_train_pack(manifest: Manifest, path: str | Path, mr_percentile: float = 99.5) -> dict[str, Any]:
    """Write the manifest's ``train`` split as a training pack (atomically); returns its header.

    Args:
        manifest: a read manifest (checksums verified).
        path: the ``.npz`` file to write; its folder must exist.
        mr_percentile: the MR percentile (``TrainSettings.mr_percentile``); recorded, and a reader
            with other settings is refused.
    """
    codes = _manifest_codes(manifest, mr_percentile)
    header = {
        "format": PACK_FORMAT, "version": PACK_VERSION, "modality": manifest.modality,
        "image_size": int(codes.codes.shape[-1]), "mr_percentile": mr_percentile,
        "intensity": codes.rule.to_dict(), "provenance": codes.provenance,
        "images_sha256": _images_sha256(_decode(codes)), "codes_dtype": str(codes.codes.dtype),
    }
    arrays = {"header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
              "codes": np.ascontiguousarray(codes.codes)}
    if codes.scales is not None:
        arrays["scales"] = codes.scales
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
    return header


def read_train_pack(path: str | Path, settings) -> TrainData:
    """The :class:`TrainData` a training pack holds, bit-identical to the manifest's.

    Raises:
        KLIPMedError: not a pack, another format version, another ``mr_percentile`` than
            ``settings``, or decoded images whose SHA-256 differs from the one recorded.
    """
    path = Path(path)
    if not path.is_file():
        raise KLIPMedError(f"--pack: expected a training pack file, found no file {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode("utf-8"))
            codes = data["codes"]
            scales = data["scales"] if "scales" in data else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise KLIPMedError(f"{path}: expected a {PACK_FORMAT} file, found unreadable content ({exc})") from None
    if header.get("format") != PACK_FORMAT or header.get("version") != PACK_VERSION:
        raise KLIPMedError(f"{path}: expected {PACK_FORMAT} version {PACK_VERSION}, found "
                           f"{header.get('format')!r} version {header.get('version')!r}")
    if header["modality"] == "MR" and header["mr_percentile"] != settings.mr_percentile:
        raise KLIPMedError(f"{path}: expected a pack made with mr_percentile {settings.mr_percentile}, "
                           f"found {header['mr_percentile']}")
    decoded = _Codes(codes, scales, IntensityRule.from_dict(header["intensity"]), header["provenance"])
    images = _decode(decoded)
    if _images_sha256(images) != header["images_sha256"]:
        raise KLIPMedError(f"{path}: expected decoded images with sha256 {header['images_sha256'][:12]}..., "
                           "found others (a corrupt pack, or a numpy that computes the intensity rule differently)")
    provenance = {**header["provenance"], "files": [tuple(f) for f in header["provenance"]["files"]],
                  "pack": {"file": path.name, "sha256": file_sha256(path)}}
    return TrainData(torch.from_numpy(images[:, None].copy()), decoded.rule, provenance, header["modality"])
