"""Null-calibrated KLIP maps in the benchmark: ``klip_z[<window>]`` rows next to the raw maps.

Two ways to get the null model (:class:`klip_med.calibration.NullModel`), both from in-distribution
(ID) images only:

- a model file (``klip-med calibrate``; e.g. fitted on the dev split's lesion-free slices and
  applied to the test split) whose conditions must match the benchmark's;
- ``"lopo"`` (leave one patient out, for choosing settings on the dev split): each image is scored
  with a model fitted on the lesion-free slices of the *other* patients of the same run, so neither
  the image's own patient nor any lesion label enters its calibration.

The z-score of a block is written onto its pixels, so the benchmark's pooling at the same block
size returns it unchanged (the rows exist only for the null model's block size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klip_med.calibration.covariates import block_covariates
from klip_med.calibration.null_model import NullModel
from klip_med.errors import KLIPMedError, expect
from klip_med.eval.cache import CachedSlice
from klip_med.score.blocks import block_to_pixels, blocks_inside_mask, pool_blocks


def method_name(windows: Sequence[str]) -> str:
    """Row name of the null-calibrated map: ``klip_z[t:0.6,1]`` for one window, ``klip_z[9 windows
    t:0.1,0.2..t:0.9,1]`` for several."""
    windows = list(windows)
    return f"klip_z[{windows[0]}]" if len(windows) == 1 else f"klip_z[{len(windows)} windows {windows[0]}..{windows[-1]}]"


def cached_blocks(entry: CachedSlice, windows: Sequence[str], block_size: int
                  ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """``(densities (W, gh, gw), covariates, inside (gh, gw))`` of a cached slice: block densities of
    its maps ``klip[<window>]``, :func:`~klip_med.calibration.covariates.block_covariates` of its posterior
    mean, and its in-body blocks (all blocks when none is inside)."""
    names = [f"klip[{w}]" for w in windows]
    missing = [n for n in names if n not in entry.maps]
    if missing:
        raise KLIPMedError(f"{entry.key}: expected the cached maps {missing} for the null model, found "
                           f"{sorted(k for k in entry.maps if k.startswith('klip['))}")
    stacked = np.stack([entry.maps[n] for n in names]).astype(np.float32)
    densities = pool_blocks(torch.from_numpy(stacked), block_size).densities.numpy()
    inside = blocks_inside_mask(torch.from_numpy(entry.body_mask.astype(bool)), block_size).numpy()
    return densities, block_covariates(entry.images[2].astype(np.float32), entry.body_mask, block_size), (
        inside if inside.any() else np.ones_like(inside))


def add_null_maps(entries: Sequence[CachedSlice], null: NullModel | str, windows: Sequence[str], block_size: int,
                  conditioning: str = "auto", conditions: dict | None = None) -> list[CachedSlice]:
    """Copies of ``entries`` with the map :func:`method_name` added (the cache is not touched).

    Args:
        null: a fitted model (its conditions checked against ``conditions`` when given) or ``"lopo"``.
        windows: labels of the cached KLIP maps the model combines (e.g. ``["t:0.6,1"]``).
        block_size: block side (a model file's own block size must equal it).
        conditioning: for ``"lopo"`` (see :class:`NullModel`; ``auto`` chooses within each fold from
            the other patients' lesion-free slices only).
    """
    blocks = {e.key: cached_blocks(e, windows, block_size) for e in entries}
    name = method_name(windows)
    if isinstance(null, NullModel):
        expect(int(null.conditions.get("block_size", block_size)) == block_size, "null model block size",
               f"the benchmark's block size {block_size}", null.conditions.get("block_size"))
        if conditions is not None:
            null.check_conditions(conditions, where="eval --null")
        models = {e.key: null for e in entries}
    elif null == "lopo":
        ids = [e for e in entries if e.label == 0]
        patients = sorted({e.patient for e in entries})
        expect(len({e.patient for e in ids}) >= 2, "--null lopo", "lesion-free slices from at least 2 patients",
               f"{len({e.patient for e in ids})}")
        fitted = {}
        for p in patients:
            others = [e for e in ids if e.patient != p]
            d, i, m = zip(*(blocks[e.key] for e in others), strict=True)
            fitted[p] = NullModel.fit(d, i, m, {"block_size": block_size, "windows": list(windows)},
                                      f"lesion-free slices of the other patients ({len(others)})", conditioning,
                                      [e.patient for e in others])
        models = {e.key: fitted[e.patient] for e in entries}
    else:
        raise KLIPMedError(f"--null: expected a null model file or 'lopo', found {null!r}")
    out = []
    for e in entries:
        densities, covariates, _ = blocks[e.key]
        z = models[e.key].z_scores(densities, covariates)
        pixels = block_to_pixels(z, block_size, e.lesion.shape).astype(np.float32)
        out.append(replace(e, maps={**e.maps, name: pixels}))
    return out


def observed_false_positive_rates(entries: Sequence[CachedSlice], null: NullModel, windows: Sequence[str],
                                  block_size: int, nominal: Sequence[float] = (0.01, 0.05)) -> dict:
    """How often the lesion-free images of a run reach the model's thresholds: the fraction of their
    in-body blocks with ``z >= null.z_threshold(a)``, for each nominal rate ``a``.

    Meaningful only when the model was fitted on *other* images (e.g. dev, applied to test): a
    calibrated model gives about ``a``.
    """
    ids = [e for e in entries if e.label == 0]
    if not ids:
        return {"n_images": 0}
    z, n_blocks = [], 0
    for e in ids:
        densities, covariates, inside = cached_blocks(e, windows, block_size)
        z.append(null.z_scores(densities, covariates)[inside])
        n_blocks += int(inside.sum())
    z = np.concatenate(z)
    return {"n_images": len(ids), "n_blocks": n_blocks,
            "rates": {f"{a:g}": {"z_threshold": null.z_threshold(a), "observed": float((z >= null.z_threshold(a)).mean())}
                      for a in nominal}}


def null_from_eval_run(run_dir: str | Path, windows: Sequence[str], block_size: int, conditions: dict[str, Any],
                       conditioning: str = "auto") -> NullModel:
    """Fit on the ID slices cached by a ``klip-med eval`` run (no new sampling).

    Args:
        run_dir: the run's ``--out`` folder.
        windows: the cached maps' window labels, e.g. ``["t:0.6,1"]`` (method ``klip[t:0.6,1]``).
        conditions: :func:`klip_med.calibration.conditions.null_conditions` of the run's prior, operator, settings and these windows.
    """
    from klip_med.eval.cache import read_slice

    files = sorted((Path(run_dir) / "slices").glob("*.npz"))
    entries = [e for e in (read_slice(f) for f in files) if e.label == 0]
    if not entries:
        raise KLIPMedError(f"{run_dir}: expected cached lesion-free (ID) slices, found none")
    labels = [windows] if isinstance(windows, str) else list(windows)
    densities, covariates, insides = zip(*(cached_blocks(e, labels, block_size) for e in entries), strict=True)
    source = f"{len(entries)} lesion-free slices of the eval run {Path(run_dir).name} ({entries[0].key}, ...)"
    return NullModel.fit(densities, covariates, insides, conditions, source, conditioning,
                         [e.patient for e in entries])
