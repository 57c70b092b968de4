"""One benchmark slice: simulate its measurement, sample the posterior once, and compute every KLIP
map and in-run baseline (:func:`process_slice`); and the engine worker that does it on a Ray actor or in
this process (:class:`SliceWorker`, :mod:`klip_med.pipeline.engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from klip_med import pipeline
from klip_med.data.selection import EvalSlice, slice_seed
from klip_med.eval.baselines import BaselineSettings, compute_baselines
from klip_med.eval.readouts import readout_maps, readout_observers
from klip_med.pipeline import KLIPSettings
from klip_med.score import KLIPAccumulator


def method_prefix(normalization: str) -> str:
    """Name prefix of our KLIP rows: ``klip`` (transition, nats) or ``klip_<normalisation>``."""
    return "klip" if normalization == "transition" else f"klip_{normalization}"


def process_slice(prior, physics_spec: str, item: EvalSlice, settings: KLIPSettings,
                  baselines: BaselineSettings, device: torch.device,
                  feature_density=None, readouts: Sequence[str] = ()
                  ) -> tuple[dict[str, np.ndarray], dict, np.ndarray, np.ndarray]:
    """Simulate, sample once, compute KLIP maps and baselines for one slice.

    ``feature_density`` is the fitted ID density of the ``cfs`` baseline (None if it is skipped);
    ``readouts`` the further KLIP read-outs filled in the same pass (:mod:`klip_med.eval.readouts`).

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
    extra_observers, readout_state = readout_observers(prior, run_settings, readouts)
    result = pipeline.reconstruct_measurement(prior, physics, y, run_settings,
                                              observers=([paper] if paper else []) + extra_observers)
    maps: dict[str, np.ndarray] = {}
    prefix = method_prefix(settings.normalization)
    for k, w in enumerate(settings.windows):
        maps[f"{prefix}[{w.label}]"] = result.klip[k].numpy().astype(np.float32)
    if paper is not None:
        paper_maps = paper.result().sample_mean().detach().cpu()
        for k, w in enumerate(settings.windows):
            maps[f"klip_paper[{w.label}]"] = paper_maps[k].numpy().astype(np.float32)
    extra_maps, readout_calls = readout_maps(result, run_settings, readouts, readout_state)
    maps.update(extra_maps)
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
    if readouts:
        meta["sampling"]["readouts"] = {"names": list(readouts), "extra_network_calls_per_image": readout_calls}
    images = np.stack([item.image, result.baseline.numpy(), result.recon_mean.numpy(), result.recon_std.numpy()])
    return maps, meta, result.body_mask.numpy().astype(bool), images


@dataclass(frozen=True)
class SliceWorker:
    """``make_worker`` of :func:`klip_med.pipeline.engine.run_items` for benchmark slices: loads the
    prior once per worker (a name / folder is loaded on ``device``; a loaded prior is used as it is,
    in-process or pickled to a Ray actor) and returns the item function, ``EvalSlice`` ->
    :func:`process_slice`'s ``(maps, meta, body_mask, images)``."""

    prior: Any
    physics_spec: str
    settings: KLIPSettings
    baselines: BaselineSettings
    device: str
    readouts: tuple[str, ...] = ()

    def __call__(self):
        from klip_med.priors.registry import loaded

        device = torch.device(self.device)
        prior = loaded(self.prior, device)

        def run(item: EvalSlice):
            return process_slice(prior, self.physics_spec, item, self.settings, self.baselines, device,
                                 readouts=self.readouts)

        return run
