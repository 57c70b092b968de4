"""Fit a KLIP null model (:class:`klip_med.score.null.NullModel`) on in-distribution data only.

Three sources of ID images, none of which contains anything out of distribution:

- held-out healthy slices of a data manifest (:func:`manifest_null_images`: the lesion-free slices
  the benchmark selection would use, or the lesion-free twins for inserted-lesion manifests);
- the prior's own samples (:func:`prior_null_images`): needs no data at all (the prior
  predictive: x from the prior, y = A x + noise, then the posterior run);
- the ID slices already sampled by a ``klip-med eval`` run (:func:`null_from_eval_run`): no new
  sampling, when the run's operator and settings are the ones to calibrate.

Each ID image is measured with the operator, reconstructed with the same settings as the images the
model will score, and its in-body blocks enter the model.

    from klip_med import priors
    from klip_med.calibrate import calibrate_images, prior_null_images

    prior = priors.load("mri-brain-flair-128")
    images = prior_null_images(prior, 16, seed=0)
    null = calibrate_images(prior, "mri:accel=4,center=0.08,noise=0.01", settings, images, "prior samples")
    null.save("null.json")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klip_med.errors import KLIPMedError, expect
from klip_med.pipeline import KLIPSettings, SliceResult, reconstruct_image
from klip_med.score.null import NullModel, block_covariates
from klip_med.score.windows import Window


def _window_dict(window: Window) -> dict[str, Any]:
    return {"name": window.label, "sigma_min": round(float(window.sigma_min), 6),
            "sigma_max": None if np.isinf(window.sigma_max) else round(float(window.sigma_max), 6)}


def weights_digest(prior) -> str:
    """SHA-256 of the prior's weights (a null model must not outlive a retrained prior)."""
    from klip_med.priors.identity import prior_identity

    return prior_identity(prior)["weights_sha256"]


def null_conditions(prior, physics_spec: str, settings: KLIPSettings, windows: Sequence[Window] | None = None,
                    weights_sha256: str | None = None) -> dict[str, Any]:
    """What a null model depends on: prior weights, operator, sampler settings, windows, block size.

    ``windows`` default to ``settings.windows``. The seed is not a condition (the model describes
    the distribution over seeds).
    """
    windows = settings.windows if windows is None else tuple(windows)
    return {
        "prior": getattr(getattr(prior, "config", None), "name", type(prior).__name__),
        "prior_weights_sha256": weights_sha256 or weights_digest(prior),
        "physics": physics_spec,
        "samples": settings.samples, "steps": settings.steps, "sampler": settings.sampler,
        "normalization": settings.normalization,
        **({"dps_zeta": settings.dps_zeta} if settings.sampler == "dps" else {}),
        "windows": [_window_dict(w) for w in windows], "block_size": settings.block_size,
    }


def result_blocks(result: SliceResult, block_size: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """``(densities, covariates, inside)`` of one reconstruction: (W, gh, gw) block densities of
    every window's KLIP map (nats per pixel), :func:`~klip_med.score.null.block_covariates`, and
    (gh, gw) in-body blocks."""
    from klip_med.score.blocks import blocks_inside_mask, pool_blocks

    densities = pool_blocks(result.klip, block_size).densities.numpy()
    inside = blocks_inside_mask(result.body_mask, block_size).numpy()
    if not inside.any():
        inside = np.ones_like(inside)
    return densities, block_covariates(result.recon_mean.numpy(), result.body_mask.numpy(), block_size), inside


def apply_null(null: NullModel, result: SliceResult,
               windows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Combined z-scores and p-values (each (gh, gw)) of one reconstruction's blocks under ``null``.

    Args:
        windows: indices into the result's windows of the model's windows, in the model's order
            (:func:`null_windows`); None: the result's windows are exactly the model's.
    """
    densities, covariates, _ = result_blocks(result, int(null.conditions["block_size"]))
    if windows is not None:
        densities = densities[list(windows)]
    z = null.z_scores(densities, covariates)
    return z, null.p_values(z)


def calibrate_images(prior, physics_spec: str, settings: KLIPSettings, images: Sequence[np.ndarray] | torch.Tensor,
                     source: str, conditioning: str = "auto", device: str | torch.device = "cpu",
                     log: Callable[[str], None] | None = print, groups: Sequence[str] | None = None) -> NullModel:
    """Measure and reconstruct ID images, then fit the null model on their in-body blocks.

    Args:
        images: N ground-truth images (H, W) in prior units on the prior's grid.
        source: description recorded in the model.
        conditioning: see :class:`~klip_med.score.null.NullModel` (``auto`` by default).
        groups: group of each image (e.g. its patient) for ``auto``'s held-out selection.
        settings: as used for the images to be scored (the model covers all its windows); image ``k`` is measured and sampled with
            seed ``settings.seed + 1000 * k`` (independent operator draws and noise).
    """
    say = log or (lambda _m: None)
    expect(len(images) >= 2, "images", "at least 2 in-distribution images", len(images))
    blocks = []
    start = time.perf_counter()
    for k, image in enumerate(images):
        t0 = time.perf_counter()
        img = torch.as_tensor(np.asarray(image, dtype=np.float32))
        result, _ = reconstruct_image(prior, img, physics_spec, replace(settings, seed=settings.seed + 1000 * k), device)
        blocks.append(result_blocks(result, settings.block_size))
        say(f"[{k + 1}/{len(images)}] calibration image: {time.perf_counter() - t0:.1f} s")
    densities, covariates, insides = zip(*blocks, strict=True)
    null = NullModel.fit(densities, covariates, insides, null_conditions(prior, physics_spec, settings), source,
                         conditioning, groups)
    null.extra["seconds"] = round(time.perf_counter() - start, 1)
    return null


def manifest_null_images(manifest, split: str, prior, max_patients: int | None = None, max_slices: int = 6,
                         seed: int = 0) -> tuple[list[np.ndarray], str, list[str]]:
    """Lesion-free slices of a manifest split (the benchmark selection's ID images), prior units.

    Returns:
        ``(images, source, groups)``: the images, a description naming the manifest, split and
        slices, and each image's patient (the benchmark's bootstrap unit).
    """
    from klip_med.eval.selection import select_slices

    chosen = [s for s in select_slices(manifest, split, prior, max_patients, max_slices, "auto", seed) if s.label == 0]
    if not chosen:
        raise KLIPMedError(f"{manifest.source}: expected lesion-free slices in split {split!r}, found none")
    keys = [s.key for s in chosen]
    return ([s.image for s in chosen], f"{manifest.name} {split}: {len(keys)} lesion-free slices ({', '.join(keys[:3])}, ...)",
            [s.patient for s in chosen])


def prior_null_images(prior, n: int, seed: int = 0, steps: int = 100) -> list[np.ndarray]:
    """``n`` unconditional samples of the prior (MONAI DDIM, ``eta = 1``), each (H, W) prior units."""
    from klip_med.priors.evaluate import unconditional_samples

    expect(isinstance(n, int) and n >= 2, "prior samples", "an integer >= 2", n)
    generator = torch.Generator(device=prior.device).manual_seed(seed)
    with torch.no_grad():
        samples = unconditional_samples(prior, n, generator, steps).cpu().numpy()
    return [s[0] for s in samples]


def null_from_eval_run(run_dir: str | Path, windows: Sequence[str], block_size: int, conditions: dict[str, Any],
                       conditioning: str = "auto") -> NullModel:
    """Fit on the ID slices cached by a ``klip-med eval`` run (no new sampling).

    Args:
        run_dir: the run's ``--out`` folder.
        windows: the cached maps' window labels, e.g. ``["t:0.6,1"]`` (method ``klip[t:0.6,1]``).
        conditions: :func:`null_conditions` of the run's prior, operator, settings and these windows.
    """
    from klip_med.eval.cache import read_slice
    from klip_med.eval.nulls import cached_blocks

    files = sorted((Path(run_dir) / "slices").glob("*.npz"))
    entries = [e for e in (read_slice(f) for f in files) if e.label == 0]
    if not entries:
        raise KLIPMedError(f"{run_dir}: expected cached lesion-free (ID) slices, found none")
    labels = [windows] if isinstance(windows, str) else list(windows)
    densities, covariates, insides = zip(*(cached_blocks(e, labels, block_size) for e in entries), strict=True)
    source = f"{len(entries)} lesion-free slices of the eval run {Path(run_dir).name} ({entries[0].key}, ...)"
    return NullModel.fit(densities, covariates, insides, conditions, source, conditioning,
                         [e.patient for e in entries])


NULLS_DIR = "nulls"
"""Folder of a prior (shipped or trained) searched for null models by :func:`find_null`."""


def null_windows(null: NullModel, settings: KLIPSettings) -> list[int]:
    """Indices into ``settings.windows`` of the model's windows (matched by name and noise range).

    Raises:
        KLIPMedError: a window of the model is not among the run's.
    """
    have = [_window_dict(w) for w in settings.windows]
    out = []
    for w in null.conditions.get("windows", []):
        expect(w in have, "null model windows", f"each of its windows among the run's ({[h['name'] for h in have]})",
               f"{w['name']} missing")
        out.append(have.index(w))
    return out


def run_conditions(null: NullModel, prior, physics_spec: str, settings: KLIPSettings,
                   weights_sha256: str | None = None) -> dict[str, Any]:
    """The run's :func:`null_conditions` over the model's windows (for ``check_conditions``)."""
    windows = [settings.windows[i] for i in null_windows(null, settings)]
    return null_conditions(prior, physics_spec, settings, windows, weights_sha256)


def _prior_folder(prior_reference: str | Path) -> Path | None:
    from klip_med.priors.registry import _resolve

    try:
        folder = _resolve(prior_reference)
    except KLIPMedError:  # a prior built in memory: nothing shipped with it
        return None
    return folder if folder.is_dir() else folder.parent


def resolve_null(spec: str | Path | None, prior_reference: str | Path, prior, physics_spec: str,
                 settings: KLIPSettings) -> tuple[NullModel | None, list[int], str]:
    """The null model a run uses, and which of the run's windows it scores.

    Args:
        spec: ``"auto"`` (the first model in ``<prior folder>/nulls/*.json`` fitted under this run's
            prior weights, physics, sampler settings and block size, whose windows the run has),
            ``"none"`` / None (no null model), or a path from ``klip-med calibrate`` (it must match:
            :class:`KLIPMedError` naming each difference otherwise).
        prior_reference: a shipped prior name or a prior folder (as given to ``priors.load``).

    Returns:
        ``(model or None, window indices, description)``.
    """
    if spec is None or str(spec) == "none":
        return None, [], "none"
    digest = weights_digest(prior)
    if str(spec) == "auto":
        folder = _prior_folder(prior_reference)
        for path in sorted((folder / NULLS_DIR).glob("*.json")) if folder is not None else []:
            model = NullModel.load(path)
            try:
                model.check_conditions(run_conditions(model, prior, physics_spec, settings, digest))
            except KLIPMedError:
                continue
            return model, null_windows(model, settings), f"shipped with the prior: {path.name}"
        return None, [], "none applies (auto: no null model shipped for these physics and settings)"
    path = Path(spec)
    expect(path.is_file(), "--null", "a null model JSON file from `klip-med calibrate`, 'auto' or 'none'",
           f"no such file {str(path)!r}")
    model = NullModel.load(path)
    try:
        conditions = run_conditions(model, prior, physics_spec, settings, digest)
    except KLIPMedError as exc:
        raise KLIPMedError(f"--null {path}: {exc} (pass its windows with --window)") from None
    model.check_conditions(conditions, where=f"--null {path}")
    return model, null_windows(model, settings), str(path)
