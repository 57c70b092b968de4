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

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klip_med.calibration.centring import DEFAULT_CENTRING
from klip_med.calibration.covariates import block_covariates
from klip_med.calibration.fit import fit_null
from klip_med.calibration.null_model import NullModel
from klip_med.calibration.scoring import inside_blocks
from klip_med.errors import KLIPMedError, expect
from klip_med.eval.cache import CachedSlice
from klip_med.score.blocks import block_to_pixels, pool_blocks


def method_name(windows: Sequence[str]) -> str:
    """Row name of the null-calibrated map: ``klip_z[t:0.6,1]`` for one window, ``klip_z[9 windows
    t:0.1,0.2..t:0.9,1]`` for several."""
    windows = list(windows)
    return f"klip_z[{windows[0]}]" if len(windows) == 1 else f"klip_z[{len(windows)} windows {windows[0]}..{windows[-1]}]"


def cached_blocks(entry: CachedSlice, windows: Sequence[str], block_size: int, prefix: str = "klip"
                  ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """``(densities (W, gh, gw), covariates, inside (gh, gw))`` of a cached slice: block densities of
    its maps ``<prefix>[<window>]`` (``klip``, or a read-out such as ``klip_dn``),
    :func:`~klip_med.calibration.covariates.block_covariates` of its posterior mean, and its in-body
    blocks (all blocks when none is inside)."""
    names = [f"{prefix}[{w}]" for w in windows]
    missing = [n for n in names if n not in entry.maps]
    if missing:
        raise KLIPMedError(f"{entry.key}: expected the cached maps {missing} for the null model, found "
                           f"{sorted(k for k in entry.maps if k.startswith(prefix + '['))}")
    stacked = np.stack([entry.maps[n] for n in names]).astype(np.float32)
    densities = pool_blocks(torch.from_numpy(stacked), block_size).densities.numpy()
    return (densities, block_covariates(entry.images[2].astype(np.float32), entry.body_mask, block_size),
            inside_blocks(entry.body_mask, block_size))


def null_models(entries: Sequence[CachedSlice], null: NullModel | str, windows: Sequence[str], block_size: int,
                conditioning: str = "auto", spread: str = "predictive", prefix: str = "klip",
                centring: str = DEFAULT_CENTRING) -> tuple[dict, dict]:
    """Each entry's null model and block data: ``(models, blocks)``, both keyed by entry key.

    Args:
        null: a fitted model (every entry scored by it; its block size must be ``block_size``) or
            ``"lopo"`` (each patient scored by a model fitted on the *other* patients' lesion-free
            slices, refitted here for ``block_size``).
        windows: labels of the cached KLIP maps the model combines (e.g. ``["t:0.6,1"]``).
        conditioning: for ``"lopo"`` (``auto`` chooses within each fold from the other patients'
            lesion-free slices only).
        spread: for ``"lopo"``, the per-position spread (:data:`klip_med.calibration.families.SPREADS`).
        prefix: which cached maps, ``<prefix>[<window>]`` (:func:`cached_blocks`).
        centring: for ``"lopo"``, :data:`klip_med.calibration.centring.CENTRINGS`.
    """
    blocks = {e.key: cached_blocks(e, windows, block_size, prefix) for e in entries}
    if isinstance(null, NullModel):
        expect(int(null.conditions.get("block_size", block_size)) == block_size, "null model block size",
               f"the benchmark's block size {block_size}", null.conditions.get("block_size"))
        return {e.key: null for e in entries}, blocks
    expect(null == "lopo", "--null", "a null model file, 'auto' or 'lopo'", repr(null))
    ids = [e for e in entries if e.label == 0]
    expect(len({e.patient for e in ids}) >= 2, "--null lopo", "lesion-free slices from at least 2 patients",
           f"{len({e.patient for e in ids})}")
    fitted = {}
    for p in sorted({e.patient for e in entries}):
        others = [e for e in ids if e.patient != p]
        d, c, m = zip(*(blocks[e.key] for e in others), strict=True)
        fitted[p] = fit_null(d, c, m, {"block_size": block_size, "windows": list(windows)},
                             f"lesion-free slices of the other patients ({len(others)})", conditioning,
                             [e.patient for e in others], spread=spread, centring=centring)
    return {e.key: fitted[e.patient] for e in entries}, blocks


def add_null_maps(entries: Sequence[CachedSlice], models: dict, blocks: dict, windows: Sequence[str],
                  block_size: int) -> list[CachedSlice]:
    """Copies of ``entries`` with the map :func:`method_name` added: each block's z-score under the
    entry's model (:func:`null_models`) on its pixels (the cache is not touched)."""
    name = method_name(windows)
    out = []
    for e in entries:
        densities, covariates, inside = blocks[e.key]
        z = models[e.key].z_scores(densities, covariates, inside)
        pixels = block_to_pixels(z, block_size, e.lesion.shape).astype(np.float32)
        out.append(replace(e, maps={**e.maps, name: pixels}))
    return out


def _check_run_matches(benchmark: dict, conditions: dict[str, Any], run_dir) -> None:
    """Refuse conditions that are not those the eval run sampled under (its results.json)."""
    from klip_med.calibration.conditions import differences

    settings = benchmark.get("settings", {})
    ran = {"physics": benchmark.get("physics"), "prior_weights_sha256": benchmark.get("prior_weights_sha256"),
           **{k: settings.get(k) for k in ("samples", "steps", "sampler", "normalization", "dps_zeta", "dds_eta",
                                           "dds_gamma", "cg_iters", "clip_x0") if k in settings}}
    wanted = {k: conditions[k] for k in ran if k in conditions}
    diffs = differences(ran, wanted)
    if diffs:
        raise KLIPMedError(f"{run_dir}: expected the settings the eval run sampled under, found "
                           + "; ".join(d.replace("fitted", "the run has") for d in diffs))


def null_from_eval_run(run_dir: str | Path, windows: Sequence[str], block_size: int, conditions: dict[str, Any],
                       conditioning: str = "auto", spread: str = "predictive", centring: str = DEFAULT_CENTRING) -> NullModel:
    """Fit on the ID slices cached by a ``klip-med eval`` run (no new sampling).

    Args:
        run_dir: the run's ``--out`` folder.
        windows: the cached maps' window labels, e.g. ``["t:0.6,1"]`` (method ``klip[t:0.6,1]``).
        conditions: :func:`klip_med.calibration.conditions.null_conditions` of the run's prior,
            operator, settings and these windows.

    Each slice's identity (manifest key, pixel digest) is taken from its cache, or from the run's
    ``results.json``, so the model refuses to score these slices later.
    """
    from klip_med.eval.cache import run_slices, with_current_body_mask

    entries = [with_current_body_mask(e) for e in run_slices(run_dir, current_mask=False) if e.label == 0]
    if not entries:
        raise KLIPMedError(f"{run_dir}: expected cached lesion-free (ID) slices, found none")
    labels = [windows] if isinstance(windows, str) else list(windows)
    densities, covariates, insides = zip(*(cached_blocks(e, labels, block_size) for e in entries), strict=True)
    source = f"{len(entries)} lesion-free slices of the eval run {Path(run_dir).name} ({entries[0].key}, ...)"
    known = {}
    results = Path(run_dir) / "results.json"
    if results.is_file():
        run = json.loads(results.read_text(encoding="utf-8"))
        known = {s["key"]: s.get("source") for s in run.get("slices", [])}
        _check_run_matches(run.get("benchmark", {}), conditions, run_dir)
    prints = [e.meta.get("info", {}).get("source") or known.get(e.key) or {"key": None, "sha256": None}
              for e in entries]
    return fit_null(densities, covariates, insides, conditions, source, conditioning, [e.patient for e in entries],
                    fingerprints=prints, spread=spread, centring=centring)


@dataclass(frozen=True)
class NullPlan:
    """The null model of a benchmark, settled before any sampling.

    Attributes:
        model: a fitted model, or ``"lopo"`` (fitted per patient later, from the cache).
        windows: labels of the windows it combines.
        block_size: its block size (None for ``lopo``: refitted at every block size).
        description: what it is, for results.json / results.md.
        overlapping: keys of this run's slices that are calibration images of the model (scored
            only with ``--allow-calibration-overlap``, and reported apart).
    """

    model: NullModel | str
    windows: tuple[str, ...]
    block_size: int | None
    description: str
    overlapping: frozenset[str] = frozenset()


def plan_null(null, null_windows: Sequence[str] | None, specs: Sequence[str], prior_reference, prior,
              physics_spec: str, settings, slices, allow_overlap: bool = False, centring: str = DEFAULT_CENTRING) -> NullPlan | None:
    """Resolve ``--null`` (``auto`` / a file / ``lopo`` / None) for a benchmark, checking every
    condition and the overlap with the run's slices now, before the first network call.

    Args:
        specs: the run's window labels. settings: the run's KLIPSettings (windows set).
        slices: the selected :class:`klip_med.data.selection.EvalSlice` s (their ``info["source"]``).
        centring: what ``lopo`` fits (named in its description; a model file carries its own).
    """
    from klip_med.calibration.store import resolve_null
    from klip_med.pipeline.settings import CALIBRATED_WINDOWS

    if null is None or str(null) == "none":
        return None
    if str(null) == "lopo":
        chosen = list(null_windows or (CALIBRATED_WINDOWS if set(CALIBRATED_WINDOWS) <= set(specs) else specs[:1]))
        missing = [w for w in chosen if w not in specs]
        expect(not missing, "--null-windows", f"windows among the run's ({list(specs)})", missing)
        return NullPlan("lopo", tuple(chosen), None, "lopo: each patient scored against the lesion-free slices "
                        f"of the other patients of this run (centring {centring})")
    model, indices, description = resolve_null(null, prior_reference, prior, physics_spec, settings)
    if model is None:
        return None
    chosen = tuple(settings.windows[i].label for i in indices)
    expect(null_windows is None or tuple(null_windows) == chosen, "--null-windows",
           f"the model's own windows {list(chosen)} (or nothing)", list(null_windows or []))
    hits = {s.key for s in slices if model.overlap([s.info.get("source", {})])}
    if hits and not allow_overlap:
        raise KLIPMedError(
            f"--null {null}: expected a model fitted on other images than the ones scored, found {len(hits)} of this "
            f"run's {len(slices)} slices among its calibration images (e.g. {sorted(hits)[0]}); score another split, "
            "use --null lopo, or pass --allow-calibration-overlap to report overlapping and fresh images apart")
    return NullPlan(model, chosen, int(model.conditions["block_size"]), description, frozenset(hits))
