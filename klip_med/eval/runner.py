"""The benchmark runner: slices from a manifest -> one sampling pass each -> KLIP + baselines ->
per-slice cache -> metrics, ``results.json``, ``results.md``, ROC figures.

    from klip_med.eval import run_benchmark
    from klip_med.pipeline import KLIPSettings

    results = run_benchmark("data_manifests/lgg_flair_128.json", "../shared/data", "mri-brain-flair-128",
                            "mri:accel=4,center=0.08,noise=0.01", "dev", KLIPSettings(samples=4, steps=50),
                            max_patients=None, max_slices_per_patient=10, out_dir="runs/eval-dev-4x")

Per slice (see :mod:`klip_med.data.selection` for which slices): the measurement is simulated
from the ground truth with the operator drawn from a per-slice seed (mask draw and noise; a
matched pair shares it), the pipeline samples the posterior once with two KLIP accumulators as
observers (ours, normalisation ``settings.normalization``, and the paper's), for every window at
once, and the baselines (:mod:`klip_med.eval.baselines`) are computed from that run. Each slice
is cached under ``out_dir/slices``; a rerun with the same settings skips cached slices, so an
interrupted benchmark resumes. Same seed, same device: same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from klip_med import pipeline
from klip_med.calibration.centring import DEFAULT_CENTRING
from klip_med.data.manifest import Manifest, read_manifest
from klip_med.data.selection import EvalSlice, select_slices
from klip_med.errors import KLIPMedError
from klip_med.eval.baselines import BaselineSettings
from klip_med.eval.cache import (
    CachedSlice,
    cached_fingerprint,
    read_slice,
    slice_path,
    with_current_body_mask,
    write_slice,
)
from klip_med.eval.null_rates import calibration_rates
from klip_med.eval.nulls import add_null_maps, method_name, null_models, plan_null
from klip_med.eval.posthoc import PostHoc
from klip_med.eval.readouts import check_readouts
from klip_med.eval.slice_run import SliceWorker
from klip_med.eval.results import roc_figure, write_results
from klip_med.eval.summary import REFERENCES, summarise
from klip_med.pipeline import KLIPSettings, parse_window
from klip_med.pipeline.engine import EngineOptions, run_items
from klip_med.priors.identity import prior_identity
from klip_med.score.windows import Window


def _windows(specs: Sequence[str], prior, steps: int) -> tuple[Window, ...]:
    """The benchmark's windows, checked to hold a step of a ``steps``-step run before any sampling."""
    if not specs:
        raise KLIPMedError("windows: expected at least one window spec, found none")
    windows = tuple(parse_window(s, prior.alphas_cumprod) for s in specs)
    pipeline.check_windows(prior, KLIPSettings(steps=steps, windows=windows))
    return windows


def run_benchmark(manifest: str | Path | Manifest, data_root: str | Path | None, prior, physics_spec: str,
                  split: str, settings: KLIPSettings, max_patients: int | None, max_slices_per_patient: int,
                  out_dir: str | Path, *, windows: Sequence[str] | None = None,
                  baselines: BaselineSettings | None = None, lesions: str = "auto",
                  device: str | torch.device = "cpu", block_sizes: Sequence[int] | None = None,
                  n_boot: int = 1000, min_body_fraction: float = 0.3, min_lesion_pixels: int = 30,
                  pixel_spacing_mm: float | None = None, metrics_only: bool = False, command: str | None = None,
                  log: Callable[[str], None] | None = print, null: str | Path | None = None,
                  null_windows: Sequence[str] | None = None, null_conditioning: str = "auto", null_centring: str = DEFAULT_CENTRING,
                  ct_lesions: str = "soft-tissue", allow_calibration_overlap: bool = False,
                  prior_reference: str | Path | None = None, shift: str | None = None,
                  readouts: Sequence[str] = (), engine: EngineOptions | None = None) -> dict:
    """Run (or resume) a benchmark and write its results.

    Args:
        manifest: manifest path (read with ``data_root``) or a read :class:`Manifest`.
        data_root: folder the manifest's files are relative to (None: ``$KLIP_MED_DATA_ROOT``).
        prior: a prior name / folder (loaded on ``device``) or a loaded ``DiffusionPrior``.
        physics_spec: operator, e.g. ``"mri:accel=4,center=0.08,noise=0.01"``.
        split: ``dev`` (choose settings here) or ``test`` (final numbers only).
        settings: sampler, samples, steps, block size, top-k, normalisation, seed (its windows are
            replaced by ``windows``).
        max_patients, max_slices_per_patient: see :func:`klip_med.data.selection.select_slices`.
        out_dir: results folder; per-slice cache in ``out_dir/slices``.
        windows: window specs (``full``, ``t:a,b``, ``sigma:a,b``), all filled in one pass (default:
            those of ``klip-med run``, :func:`klip_med.pipeline.default_windows`).
        baselines: settings of the baselines that call the prior again, and which to skip
            (default :class:`BaselineSettings`).
        lesions: ``auto`` / ``real`` / ``inserted``.
        block_sizes: block sides to report (default ``[settings.block_size]``); the first is
            ``results.*``, others ``results_b<size>.*`` (no resampling: maps are cached per pixel).
        n_boot: bootstrap resamples for the intervals (seeded by ``settings.seed``).
        metrics_only: compute nothing new; summarise the cached slices of this selection.
        command: the command line, recorded in the outputs.
        log: progress lines (None: silent).
        null: adds the null-calibrated row ``klip_z[...]`` (:mod:`klip_med.eval.nulls`): ``"auto"``
            (the model shipped with the prior for these settings, as ``klip-med run``), a null model
            file from ``klip-med calibrate``, or ``"lopo"`` (leave one patient out over this run's
            lesion-free slices, refitted for every block size); None: no such row. A model gives
            the row for its own block size only. Conditions and the overlap with this run's slices
            are checked before any sampling.
        null_windows: the windows it combines (default: the model's; for ``lopo``
            :data:`klip_med.pipeline.CALIBRATED_WINDOWS` when the run has them all, else the first).
        null_conditioning: for ``"lopo"``, one of :data:`klip_med.calibration.CONDITIONING`.
        null_centring: for ``"lopo"``, one of :data:`klip_med.calibration.centring.CENTRINGS`.
        allow_calibration_overlap: score slices that are calibration images of the model, and
            report the rates of those and of the fresh ones apart (refused otherwise).
        prior_reference: the name / folder the prior came from (where ``auto`` looks for models;
            default ``prior`` when it is a name or folder, else its config name).
        ct_lesions: inserted CT lesion design, ``soft-tissue`` or ``body``
            (:mod:`klip_med.data.selection`, rule 5).
        shift: with ``lesions="inserted"``, the inserted shift kind (:data:`klip_med.eval.names.SHIFTS`,
            :mod:`klip_med.data.selection` rule 6); recorded in ``results.json``. One kind per run.
        readouts: further KLIP read-outs of the same sampling pass (:data:`klip_med.eval.readouts.READOUTS`),
            rows ``klip_dn[<window>]`` / ``klip_t[<window>]``; part of the slice fingerprint.
        engine: where the slices to sample run (:class:`~klip_med.pipeline.engine.EngineOptions`;
            default in this process). Ray workers load the prior by name / folder when it was given as
            one (else receive the loaded prior), sample, and send the maps back; this process adds the
            post-hoc baselines and writes the cache, so results equal a local run's, whatever the order.

    Returns:
        the results dict of the first block size (as written to ``results.json``).
    """
    say = log or (lambda _msg: None)
    baselines = baselines or BaselineSettings()
    engine = engine or EngineOptions()
    prior_source = prior  # what a Ray worker loads (a name / folder), or the loaded prior itself
    device = torch.device(device)
    out = Path(out_dir)
    if isinstance(manifest, (str, Path)):
        manifest = read_manifest(manifest, data_root)
    if isinstance(prior, (str, Path)):
        from klip_med.priors import load

        prior_reference = prior_reference or prior
        prior = load(prior, device=device)
    prior_reference = prior_reference or prior.config.name
    specs = list(windows) if windows else [w.label for w in pipeline.default_windows(prior, settings)]
    win = _windows(specs, prior, settings.steps)
    settings = replace(settings, windows=win)
    slices = select_slices(manifest, split, prior, max_patients, max_slices_per_patient, lesions, settings.seed,
                           min_body_fraction, min_lesion_pixels, pixel_spacing_mm, ct_lesions, shift)
    plan = plan_null(null, null_windows, specs, prior_reference, prior, physics_spec, settings, slices,
                     allow_calibration_overlap, null_centring)
    if plan is not None and plan.overlapping:
        say(f"{len(plan.overlapping)} slices are calibration images of the null model: scored, reported apart")
    mode = ("real" if manifest.mask_key else "inserted") if lesions == "auto" else lesions
    if mode == "inserted" and shift is not None:
        mode = f"inserted ({shift})"
    elif mode == "inserted" and manifest.modality == "CT":
        mode = f"inserted ({ct_lesions})"
    prior_id = prior_identity(prior)
    sampling = {k: v for k, v in settings.describe().items() if k not in ("top_k", "block_size")}  # post hoc
    readouts = check_readouts(readouts)
    if readouts:  # absent otherwise, so caches made before read-outs existed stay valid
        sampling["readouts"] = readouts
    post = PostHoc(manifest, prior, prior_reference, physics_spec, sampling, prior_id["weights_sha256"], baselines,
                   device, settings.seed, min_body_fraction, say)  # sampling fingerprint; post-hoc baselines apart
    folder = out / "slices"
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[int, CachedSlice] = {}
    todo: dict[str, tuple[int, EvalSlice, Path, dict]] = {}
    computed = skipped = 0
    start = time.perf_counter()
    for n, item in enumerate(slices):
        path = slice_path(folder, item.key)
        stamp = post.stamp(item)
        if post.accepts(cached_fingerprint(path), item, stamp):
            t0 = time.perf_counter()
            stored, cached, added = post.complete(read_slice(path), stamp, compute=not metrics_only)
            if added:  # baselines added from the cached posterior mean: the sampling run is kept
                write_slice(path, stored)
                say(f"[{n + 1}/{len(slices)}] {item.key}: added {', '.join(added)} from the cached posterior mean "
                    f"({time.perf_counter() - t0:.1f} s)")
            found[n] = replace(cached, meta={**cached.meta, "info": item.info})  # today's selection info
        elif metrics_only:
            skipped += 1
        else:
            todo[item.key] = (n, item, path, stamp)

    def finished(outcome) -> None:  # on this process, as each slice comes back from its worker
        n, item, path, stamp = todo[outcome.key]
        if not outcome.ok:
            say(f"[{n + 1}/{len(slices)}] {item.key}: FAILED on {outcome.worker}: {outcome.error}")
            return
        maps, meta, body, images = outcome.value
        meta.update({"fingerprint": stamp, "info": item.info})
        entry = CachedSlice(item.key, item.patient, item.label, maps, item.lesion, body, images, meta)
        stored, found[n], _ = post.complete(entry, stamp)
        write_slice(path, stored)
        say(f"[{n + 1}/{len(slices)}] {item.key} ({'OOD' if item.label else 'ID'}): {outcome.seconds:.1f} s"
            + ("" if engine.engine == "local" else f" on {outcome.worker}"))  # flushed: a log file shows progress

    worker = SliceWorker(prior_source if engine.engine == "ray" else prior, physics_spec, settings, post.in_run,
                         str(device), tuple(readouts))
    outcomes = run_items(worker, [(key, item) for key, (_, item, _, _) in todo.items()], engine, finished)
    failed = [o for o in outcomes if not o.ok]
    computed = len(outcomes) - len(failed)
    if failed:  # the others are cached: a rerun samples only these
        raise KLIPMedError(f"{len(failed)} of {len(outcomes)} slices failed ({computed} cached for a rerun); "
                           f"first: {failed[0].key}: {failed[0].error}")
    entries = [found[n] for n in sorted(found)]  # the selection's order, whatever order workers finished in
    say(f"{computed} slices computed, {len(entries) - computed} from cache, {skipped} missing "
        f"({time.perf_counter() - start:.1f} s)")
    if not entries:
        raise KLIPMedError(f"{folder}: expected cached slices for --metrics-only, found none")
    entries = [with_current_body_mask(e) for e in entries]
    sizes = list(block_sizes or [settings.block_size])
    first = None
    for k, size in enumerate(sizes):
        scored, calibration = entries, None
        if plan is not None and plan.block_size in (size, None):
            try:
                models, blocks = null_models(entries, plan.model, plan.windows, size, null_conditioning,
                                             centring=null_centring)
                scored = add_null_maps(entries, models, blocks, plan.windows, size)
                calibration = _calibration(entries, models, blocks, plan, n_boot, settings.seed)
            except KLIPMedError as exc:
                if k == 0:
                    raise
                say(f"no klip_z row at {size}x{size} blocks: {exc}")  # a further block size, e.g. too coarse
        results, curves = _results(scored, manifest, split, prior_id, physics_spec, settings, baselines, mode,
                                   device, size, n_boot, computed, skipped, command)
        results["benchmark"]["shift"] = shift  # the inserted shift kind (None: real lesions / the default design)
        default = method_name(plan.windows) if plan is not None and method_name(plan.windows) in results["methods"] \
            else f"klip[{specs[0]}]"
        if default in results["methods"]:
            results["methods"][default]["default"] = True
            results["default_method"] = default
        if calibration is not None:
            results["null_calibration"] = calibration
        stem = "results" if k == 0 else f"results_b{size}"
        write_results(results, out, stem)
        title = f"{manifest.name} {split}, {physics_spec}\n{len(entries)} images, {size}x{size} blocks"
        roc_figure(curves["dataset"], out / f"{stem}_roc_dataset.png", f"dataset-level ROC: {title}")
        roc_figure(curves["localisation"], out / f"{stem}_roc_localisation.png",
                   f"localisation ROC, blocks inside the body of OOD images pooled: {title}")
        say(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}")
        first = first or results
    return first


def _calibration(entries, models, blocks, plan, n_boot: int, seed: int) -> dict:
    """``results.json["null_calibration"]``: the observed rates of the run's lesion-free images
    (:func:`klip_med.eval.null_rates.calibration_rates`); calibration images of the model, when
    allowed, apart under ``overlapping``."""
    ids = [e for e in entries if e.label == 0]
    fresh = [e for e in ids if e.key not in plan.overlapping]
    out = {"null": plan.description, "windows": list(plan.windows),
           **calibration_rates(fresh, models, blocks, n_boot, seed)}
    overlapping = [e for e in ids if e.key in plan.overlapping]
    if overlapping:
        out["overlapping"] = {"note": "calibration images of the model itself: not a measure of its calibration",
                              **calibration_rates(overlapping, models, blocks, n_boot, seed)}
    return out


def _results(entries, manifest, split, prior_id, physics_spec, settings, baselines, mode, device, block_size,
             n_boot, computed, skipped, command) -> tuple[dict, dict]:
    methods, curves = summarise(entries, block_size, settings.top_k, n_boot, settings.seed, REFERENCES)
    labels = [e.label for e in entries]
    results = {
        "benchmark": {
            "manifest": manifest.name, "manifest_file": str(manifest.source), "split": split,
            "physics": physics_spec, "prior": prior_id["name"], "prior_weights_sha256": prior_id["weights_sha256"],
            "settings": settings.describe(), "baselines": baselines.describe(), "lesions": mode,
            "block_size": block_size, "n_boot": n_boot, "seed": settings.seed, "device": str(device),
            "torch": torch.__version__, "command": command,
            "selection": "klip_med.data.selection (module docstring): body fraction >= 0.3, OOD >= 30 lesion px "
                         "at 128x128, ID matched by body fraction within the patient, even subsample per patient",
        },
        "counts": {"images": len(entries), "ood": int(sum(labels)), "id": len(labels) - int(sum(labels)),
                   "patients": len({e.patient for e in entries}), "computed_now": computed, "missing": skipped},
        "sampling": {"nfe_per_image": int(np.mean([e.meta["sampling"]["nfe_per_image"] for e in entries])),
                     "seconds_per_image": float(np.mean([e.meta["sampling"]["seconds"] for e in entries]))},
        "references": [r for r in REFERENCES if r in methods],
        "methods": methods,
        "slices": [{"key": e.key, "patient": e.patient, "label": e.label, **e.meta.get("info", {})} for e in entries],
    }
    return results, curves
