"""Calibrate: reconstruct in-distribution images and fit a null model
(:class:`klip_med.calibration.NullModel`) on their block maps.

Three sources of ID images, none of which contains anything out of distribution:

- held-out healthy slices of a data manifest (:func:`manifest_null_images`: the lesion-free slices
  the benchmark selection would use, or the lesion-free twins for inserted-lesion manifests);
- the prior's own samples (:func:`prior_null_images`): needs no data at all (the prior
  predictive: x from the prior, y = A x + noise, then the posterior run);
- the ID slices already sampled by a ``klip-med eval`` run
  (:func:`klip_med.eval.nulls.null_from_eval_run`): no new sampling.

Each ID image is measured with the operator, reconstructed with the same settings as the images the
model will score, and its in-body blocks enter the model.

    from klip_med import priors
    from klip_med.pipeline.calibrate import calibrate_images, prior_null_images

    prior = priors.load("mri-brain-flair-128")
    images = prior_null_images(prior, 16, seed=0)
    null = calibrate_images(prior, "mri:accel=4,center=0.08,noise=0.01", settings, images, "prior samples")
    null.save("null.json")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klip_med.calibration.centring import DEFAULT_CENTRING
from klip_med.calibration.conditions import null_conditions
from klip_med.calibration.fit import fit_null
from klip_med.calibration.null_model import NullModel
from klip_med.calibration.scoring import result_blocks
from klip_med.errors import KLIPMedError, expect
from klip_med.pipeline.engine import EngineOptions, run_items
from klip_med.pipeline.reconstruct import reconstruct_image
from klip_med.pipeline.settings import KLIPSettings


@dataclass(frozen=True)
class CalibrationWorker:
    """``make_worker`` of :func:`klip_med.pipeline.engine.run_items` for calibration images: loads the
    prior once per worker (a name / folder on ``device``; a loaded prior as it is) and returns the item
    function ``(k, image)`` -> :func:`~klip_med.calibration.scoring.result_blocks` of image ``k``
    reconstructed with seed ``settings.seed + 1000 * k``."""

    prior: Any
    physics_spec: str
    settings: KLIPSettings
    device: str

    def __call__(self):
        from klip_med.priors.registry import loaded

        prior = loaded(self.prior, self.device)

        def run(item):
            k, image = item
            img = torch.as_tensor(np.asarray(image, dtype=np.float32))
            result, _ = reconstruct_image(prior, img, self.physics_spec,
                                          replace(self.settings, seed=self.settings.seed + 1000 * k), self.device)
            return result_blocks(result, self.settings.block_size)

        return run


def calibrate_images(prior, physics_spec: str, settings: KLIPSettings, images: Sequence[np.ndarray] | torch.Tensor,
                     source: str, conditioning: str = "auto", device: str | torch.device = "cpu",
                     log: Callable[[str], None] | None = print, groups: Sequence[str] | None = None,
                     fingerprints: Sequence[dict] = (), spread: str = "predictive", centring: str = DEFAULT_CENTRING,
                     engine: EngineOptions | None = None, prior_source: str | Path | None = None) -> NullModel:
    """Measure and reconstruct ID images, then fit the null model on their in-body blocks.

    Args:
        images: N ground-truth images (H, W) in prior units on the prior's grid.
        source: description recorded in the model.
        conditioning: see :class:`~klip_med.calibration.NullModel` (``auto`` by default).
        groups: group of each image (e.g. its patient) for ``auto``'s held-out selection.
        fingerprints: one ``{"key", "sha256"}`` per image (:mod:`klip_med.data.identity`), recorded in
            the model so that it refuses to score its own calibration images; or none.
        spread: the per-position spread estimator (:data:`klip_med.calibration.families.SPREADS`).
        centring: :data:`klip_med.calibration.centring.CENTRINGS` (the patient's own level removed per slice).
        settings: as used for the images to be scored (the model covers all its windows); image ``k`` is measured and sampled with
            seed ``settings.seed + 1000 * k`` (independent operator draws and noise).
        engine: where the images are reconstructed (default: in this process, in order); with Ray each
            worker loads ``prior_source`` (the prior's name / folder; default: the loaded prior is sent).
            The model is the same whatever the engine: each image has its own seed.
    """
    say = log or (lambda _m: None)
    expect(len(images) >= 2, "images", "at least 2 in-distribution images", len(images))
    engine = engine or EngineOptions()
    start = time.perf_counter()
    blocks: dict[int, tuple] = {}

    def finished(outcome) -> None:
        k = int(outcome.key)
        if outcome.ok:
            blocks[k] = outcome.value
            say(f"[{len(blocks)}/{len(images)}] calibration image {k + 1}: {outcome.seconds:.1f} s")

    worker = CalibrationWorker(prior_source if engine.engine == "ray" and prior_source is not None else prior,
                               physics_spec, settings, str(device))
    outcomes = run_items(worker, [(str(k), (k, image)) for k, image in enumerate(images)], engine, finished)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise KLIPMedError(f"calibration: {len(failed)} of {len(images)} images failed; first, image "
                           f"{int(failed[0].key) + 1}: {failed[0].error}")
    densities, covariates, insides = zip(*(blocks[k] for k in range(len(images))), strict=True)
    null = fit_null(densities, covariates, insides, null_conditions(prior, physics_spec, settings), source,
                    conditioning, groups, fingerprints=fingerprints, spread=spread, centring=centring)
    null.extra["seconds"] = round(time.perf_counter() - start, 1)
    return null


def manifest_null_images(manifest, split: str, prior, max_patients: int | None = None, max_slices: int = 6,
                         seed: int = 0) -> tuple[list[np.ndarray], str, list[str], list[dict]]:
    """Lesion-free slices of a manifest split (the benchmark selection's ID images), prior units.

    Returns:
        ``(images, source, groups, fingerprints)``: the images, a description naming the manifest,
        split and slices, each image's patient (the benchmark's bootstrap unit) and its identity
        (``{"key", "sha256"}``, :mod:`klip_med.data.identity`).
    """
    from klip_med.data.selection import select_slices

    chosen = [s for s in select_slices(manifest, split, prior, max_patients, max_slices, "auto", seed) if s.label == 0]
    if not chosen:
        raise KLIPMedError(f"{manifest.source}: expected lesion-free slices in split {split!r}, found none")
    keys = [s.key for s in chosen]
    source = f"{manifest.name} {split}: {len(keys)} lesion-free slices of {len({s.patient for s in chosen})} patients"
    return ([s.image for s in chosen], f"{source} ({', '.join(keys[:3])}, ...)", [s.patient for s in chosen],
            [dict(s.info["source"]) for s in chosen])


def prior_null_images(prior, n: int, seed: int = 0, steps: int = 100) -> list[np.ndarray]:
    """``n`` unconditional samples of the prior (MONAI DDIM, ``eta = 1``), each (H, W) prior units."""
    from klip_med.priors.evaluate import unconditional_samples

    expect(isinstance(n, int) and n >= 2, "prior samples", "an integer >= 2", n)
    generator = torch.Generator(device=prior.device).manual_seed(seed)
    with torch.no_grad():
        samples = unconditional_samples(prior, n, generator, steps).cpu().numpy()
    return [s[0] for s in samples]
