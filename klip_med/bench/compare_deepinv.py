"""deepinv's own DPS on the same prior, steps, samples and slice: through klip_med's observing
adapter (:func:`klip_med.sampling.deepinv_adapter.deepinv_dps`, KLIP maps included) and plain
(``deepinv.sampling.DPS`` with deepinv's ``AncestralSolver``, only our ``EpsilonDenoiser``).

Both run N solver steps of one network forward + one backward each, like our ``dps`` sampler,
plus at most one final denoising call.
"""

from __future__ import annotations

from typing import Any

import torch

from klip_med.bench.case import posterior_means, psnr_db
from klip_med.bench.runs import Runner
from klip_med.bench.timing import median


def _adapter_model(prior, steps: int, observers, weight: float, generator: torch.Generator):
    from klip_med.sampling.deepinv_adapter import deepinv_dps

    return deepinv_dps(prior, steps, observers, weight=weight, generator=generator)


def _plain_model(prior, steps: int, observers, weight: float, generator: torch.Generator):
    import deepinv as dinv

    from klip_med.sampling.deepinv_adapter import EpsilonDenoiser

    solver = dinv.sampling.AncestralSolver(timesteps=torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32),
                                           eta=1.0, variance="small", rng=generator)
    model = dinv.sampling.DPS(EpsilonDenoiser(prior), solver=solver, weight=weight, dtype=torch.float32,
                              device=generator.device, minus_one_one=False)
    model.data_fidelity.clip = [-1.0, 1.0]
    return model


VARIANTS = {"adapter": _adapter_model, "plain": _plain_model}


def _timed(runner: Runner, build, prior, steps: int, observers=()) -> tuple[torch.Tensor, float]:
    """One run of a deepinv variant from a freshly seeded generator: ``(samples, seconds)``."""
    model = build(prior, steps, list(observers), runner.settings.deepinv_weight, runner.generator())
    shape = (runner.rows, *prior.image_shape)
    y = runner.y_rows()
    return runner.clock.time(lambda: model(y, runner.case.physics, x_init=shape).detach())


def run_deepinv(runner: Runner, prior) -> dict[str, Any]:
    """Warm-up and timed runs of both deepinv variants; seconds per slice (median) and PSNR."""
    settings, case = runner.settings, runner.case
    out: dict[str, Any] = {"weight": settings.deepinv_weight, "steps": settings.steps, "samples": settings.samples,
                           "note": "N solver steps of 1 network forward + 1 backward each; deepinv's final "
                                   "denoising adds at most one forward"}
    for name, build in VARIANTS.items():
        for _ in range(settings.warmup):
            _timed(runner, build, prior, min(settings.steps, 3))
        times, samples = [], None
        for _ in range(settings.compare_repeats):
            accumulator = runner.accumulator(prior) if name == "adapter" else None
            samples, seconds = _timed(runner, build, prior, settings.steps, [accumulator] if accumulator else ())
            times.append(seconds)
        mean = posterior_means(samples, settings, prior.image_shape)
        out[name] = {
            "seconds": times,
            "seconds_per_slice": median(times) / settings.batch,
            "psnr_db": psnr_db(mean, case.truth) if case.trained else None,
        }
    return out
