"""The benchmark runner: slices from a manifest -> one sampling pass each -> KLIP + baselines ->
per-slice cache -> metrics, ``results.json``, ``results.md``, ROC figures.

    from klip_med.eval import run_benchmark
    from klip_med.pipeline import KLIPSettings

    results = run_benchmark("data_manifests/lgg_flair_128.json", "../shared/data", "mri-brain-flair-128",
                            "mri:accel=4,center=0.08,noise=0.01", "dev", KLIPSettings(samples=4, steps=100),
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
from klip_med.calibration.null_model import NullModel
from klip_med.data.manifest import Manifest, read_manifest
from klip_med.data.selection import EvalSlice, select_slices, slice_seed
from klip_med.errors import KLIPMedError
from klip_med.eval.baselines import BaselineSettings, compute_baselines
from klip_med.eval.cache import (
    CachedSlice,
    cached_fingerprint,
    fingerprint,
    read_slice,
    slice_path,
    write_slice,
)
from klip_med.eval.names import DEFAULT_WINDOWS  # noqa: E402  (re-exported)
from klip_med.eval.nulls import add_null_maps, observed_false_positive_rates
from klip_med.eval.results import roc_figure, write_results
from klip_med.eval.summary import REFERENCES, summarise
from klip_med.pipeline import KLIPSettings, parse_window
from klip_med.priors.identity import prior_identity
from klip_med.score import KLIPAccumulator
from klip_med.score.windows import Window


def _windows(specs: Sequence[str], prior, steps: int) -> tuple[Window, ...]:
    """The benchmark's windows, checked to hold a step of a ``steps``-step run before any sampling."""
    if not specs:
        raise KLIPMedError("windows: expected at least one window spec, found none")
    windows = tuple(parse_window(s, prior.alphas_cumprod) for s in specs)
    pipeline.check_windows(prior, KLIPSettings(steps=steps, windows=windows))
    return windows


def method_prefix(normalization: str) -> str:
    """Name prefix of our KLIP rows: ``klip`` (transition, nats) or ``klip_<normalisation>``."""
    return "klip" if normalization == "transition" else f"klip_{normalization}"


def process_slice(prior, physics_spec: str, item: EvalSlice, settings: KLIPSettings,
                  baselines: BaselineSettings, device: torch.device,
                  feature_density=None) -> tuple[dict[str, np.ndarray], dict, np.ndarray, np.ndarray]:
    """Simulate, sample once, compute KLIP maps and baselines for one slice.

    ``feature_density`` is the fitted ID density of the ``cfs`` baseline (None if it is skipped).

    Returns:
        ``(maps, meta, body_mask, images)``: maps name -> (H, W) float32; meta with ``sampling``
        (settings, NFE, seconds) and ``costs`` per baseline; body_mask (H, W) bool; images
        (4, H, W): truth, baseline, posterior mean, posterior std.
    """
    from klip_med.physics import parse_physics

    seed = slice_seed(settings.seed, item.seed_key)
    size = int(prior.image_shape[-1])
    physics = parse_physics(physics_spec, size, generator=torch.Generator(device=device).manual_seed(seed),
                            device=device)
    truth = torch.from_numpy(item.image).to(device, torch.float32).reshape(1, *prior.image_shape)
    with torch.no_grad():
        y = physics(truth)
    run_settings = replace(settings, seed=seed)
    paper = None if settings.normalization == "paper" else KLIPAccumulator(settings.windows, normalization="paper")
    result = pipeline.reconstruct_measurement(prior, physics, y, run_settings, observers=[paper] if paper else ())
    maps: dict[str, np.ndarray] = {}
    prefix = method_prefix(settings.normalization)
    for k, w in enumerate(settings.windows):
        maps[f"{prefix}[{w.label}]"] = result.klip[k].numpy().astype(np.float32)
    if paper is not None:
        paper_maps = paper.result().sample_mean().detach().cpu()
        for k, w in enumerate(settings.windows):
            maps[f"klip_paper[{w.label}]"] = paper_maps[k].numpy().astype(np.float32)
    generator = torch.Generator(device=device).manual_seed(seed + 2)
    costs = {}
    for name, m in compute_baselines(prior, physics, y, result, generator, baselines, feature_density).items():
        if m.pixel_map is not None:
            maps[name] = np.asarray(m.pixel_map, dtype=np.float32)
        costs[name] = {"nfe": m.nfe, "seconds": m.seconds, "native_score": m.native_score, "info": m.info}
    nfe_per_sample = int(result.metadata["network_calls"])
    meta = {
        "seed": seed,
        "sampling": {"nfe_per_image": nfe_per_sample * settings.samples, "seconds": result.metadata["seconds"],
                     "klip": result.metadata["klip"],
                     "note": "DPS adds one backward pass per forward" if settings.sampler == "dps" else ""},
        "costs": costs,
    }
    images = np.stack([item.image, result.baseline.numpy(), result.recon_mean.numpy(), result.recon_std.numpy()])
    return maps, meta, result.body_mask.numpy().astype(bool), images


def run_benchmark(manifest: str | Path | Manifest, data_root: str | Path | None, prior, physics_spec: str,
                  split: str, settings: KLIPSettings, max_patients: int | None, max_slices_per_patient: int,
                  out_dir: str | Path, *, windows: Sequence[str] = DEFAULT_WINDOWS,
                  baselines: BaselineSettings | None = None, lesions: str = "auto",
                  device: str | torch.device = "cpu", block_sizes: Sequence[int] | None = None,
                  n_boot: int = 1000, min_body_fraction: float = 0.3, min_lesion_pixels: int = 30,
                  pixel_spacing_mm: float | None = None, metrics_only: bool = False, command: str | None = None,
                  log: Callable[[str], None] | None = print, null: str | Path | None = None,
                  null_windows: Sequence[str] | None = None, null_conditioning: str = "auto",
                  ct_lesions: str = "soft-tissue") -> dict:
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
        windows: window specs (``full``, ``t:a,b``, ``sigma:a,b``), all filled in one pass.
        baselines: settings of the baselines that call the prior again, and which to skip
            (default :class:`BaselineSettings`).
        lesions: ``auto`` / ``real`` / ``inserted``.
        block_sizes: block sides to report (default ``[settings.block_size]``); the first is
            ``results.*``, others ``results_b<size>.*`` (no resampling: maps are cached per pixel).
        n_boot: bootstrap resamples for the intervals (seeded by ``settings.seed``).
        metrics_only: compute nothing new; summarise the cached slices of this selection.
        command: the command line, recorded in the outputs.
        log: progress lines (None: silent).
        null: adds the null-calibrated row ``klip_z[...]`` (:mod:`klip_med.eval.nulls`): a null
            model file from ``klip-med calibrate`` or ``"lopo"`` (leave one patient out over this
            run's lesion-free slices, refitted for every block size); None: no such row. A model
            file gives the row for its own block size only.
        null_windows: the windows it combines (default: the model file's; for ``lopo``
            :data:`klip_med.pipeline.CALIBRATED_WINDOWS` when the run has them all, else the first).
        null_conditioning: for ``"lopo"``, one of :data:`klip_med.score.null.CONDITIONING`.
        ct_lesions: inserted CT lesion design, ``soft-tissue`` or ``body``
            (:mod:`klip_med.data.selection`, rule 5).

    Returns:
        the results dict of the first block size (as written to ``results.json``).
    """
    say = log or (lambda _msg: None)
    baselines = baselines or BaselineSettings()
    device = torch.device(device)
    out = Path(out_dir)
    if isinstance(manifest, (str, Path)):
        manifest = read_manifest(manifest, data_root)
    if isinstance(prior, (str, Path)):
        from klip_med.priors import load

        prior = load(prior, device=device)
    win = _windows(windows, prior, settings.steps)
    settings = replace(settings, windows=win)
    slices = select_slices(manifest, split, prior, max_patients, max_slices_per_patient, lesions, settings.seed,
                           min_body_fraction, min_lesion_pixels, pixel_spacing_mm, ct_lesions)
    mode = ("real" if manifest.mask_key else "inserted") if lesions == "auto" else lesions
    if mode == "inserted" and manifest.modality == "CT":
        mode = f"inserted ({ct_lesions})"
    prior_id = prior_identity(prior)
    parts = {"physics": physics_spec, "settings": settings.describe(), "baselines": baselines.describe(),
             "prior": prior_id["weights_sha256"], "version": 1}
    wants_cfs = "cfs" not in baselines.skip
    if wants_cfs:  # the cfs density depends on the training slices too
        parts["train_files"] = sorted({item.sha256 for item in manifest.split("train")})
    density = None
    folder = out / "slices"
    folder.mkdir(parents=True, exist_ok=True)
    entries: list[CachedSlice] = []
    computed = skipped = 0
    start = time.perf_counter()
    for n, item in enumerate(slices):
        path = slice_path(folder, item.key)
        stamp = fingerprint({**parts, "key": item.key, "seed_key": item.seed_key}, (item.image, item.lesion))
        if cached_fingerprint(path) == stamp:
            entries.append(read_slice(path))
            continue
        if metrics_only:
            skipped += 1
            continue
        if wants_cfs and density is None:
            density = _fit_cfs(manifest, prior, baselines, settings.seed, device, min_body_fraction, say)
        t0 = time.perf_counter()
        maps, meta, body, images = process_slice(prior, physics_spec, item, settings, baselines, device, density)
        meta.update({"fingerprint": stamp, "info": item.info})
        entry = CachedSlice(item.key, item.patient, item.label, maps, item.lesion, body, images, meta)
        write_slice(path, entry)
        entries.append(entry)
        computed += 1
        say(f"[{n + 1}/{len(slices)}] {item.key} ({'OOD' if item.label else 'ID'}): "
            f"{time.perf_counter() - t0:.1f} s")
    say(f"{computed} slices computed, {len(entries) - computed} from cache, {skipped} missing "
        f"({time.perf_counter() - start:.1f} s)")
    if not entries:
        raise KLIPMedError(f"{folder}: expected cached slices for --metrics-only, found none")
    sizes = list(block_sizes or [settings.block_size])
    null_rows = _null_rows(null, null_windows, null_conditioning, windows, prior, prior_id, physics_spec, settings,
                           sizes)
    first = None
    for k, size in enumerate(sizes):
        scored, calibration = entries, None
        if null_rows is not None and null_rows["block_size"] in (size, None):
            try:
                scored = add_null_maps(entries, null_rows["model"], null_rows["windows"], size, null_conditioning,
                                       null_rows["conditions"])
            except KLIPMedError as exc:
                if k == 0:
                    raise
                say(f"no klip_z row at {size}x{size} blocks: {exc}")  # a further block size, e.g. too coarse
            if isinstance(null_rows["model"], NullModel):
                calibration = observed_false_positive_rates(entries, null_rows["model"], null_rows["windows"], size)
                calibration["null"] = str(null)
        results, curves = _results(scored, manifest, split, prior_id, physics_spec, settings, baselines, mode,
                                   device, size, n_boot, computed, skipped, command)
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


def _null_rows(null, null_windows, conditioning, windows, prior, prior_id, physics_spec, settings, sizes):
    """What :func:`add_null_maps` needs for ``run_benchmark``'s ``null`` argument (None: no row)."""
    if null is None:
        return None
    from klip_med.calibration.conditions import null_conditions
    from klip_med.calibration.null_model import NullModel
    from klip_med.pipeline.settings import CALIBRATED_WINDOWS

    if str(null) == "lopo":
        chosen = list(null_windows or (CALIBRATED_WINDOWS if set(CALIBRATED_WINDOWS) <= set(windows) else windows[:1]))
        return {"model": "lopo", "windows": chosen, "block_size": None, "conditions": None}  # every block size
    model = NullModel.load(null)
    chosen = list(null_windows or [w["name"] for w in model.conditions.get("windows", [])])
    missing = [w for w in chosen if w not in windows]
    if missing:
        raise KLIPMedError(f"--null {null}: expected its windows {chosen} among --windows {list(windows)}, "
                           f"missing {missing}")
    wins = [next(w for w in settings.windows if w.label == label) for label in chosen]
    conditions = null_conditions(prior, physics_spec, settings, wins, prior_id["weights_sha256"])
    return {"model": model, "windows": chosen, "block_size": int(model.conditions["block_size"]),
            "conditions": conditions}


def _fit_cfs(manifest, prior, baselines: BaselineSettings, seed: int, device: torch.device,
             min_body_fraction: float, say: Callable[[str], None]):
    from klip_med.eval.features import fit_feature_density, training_slices

    t0 = time.perf_counter()
    images = training_slices(manifest, prior, baselines.cfs_train_slices, min_body_fraction)
    density = fit_feature_density(prior, images, torch.Generator(device=device).manual_seed(seed + 7),
                                  baselines.cfs_t)
    say(f"cfs: fitted the ID feature density on {density.n_slices} training slices "
        f"({density.n_locations} locations, {density.mean.numel()} features) in {time.perf_counter() - t0:.1f} s")
    return density


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
