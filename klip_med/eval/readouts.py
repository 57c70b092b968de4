"""Further KLIP read-outs a benchmark can fill in the same sampling pass (research on where a step's
surprise lives; issue 18). Each gives one map per window, named ``<readout>[<window>]``:

- ``klip_dn``: the same KL per step, split over pixels by the prior's denoiser instead of by the
  data-consistency correction (:class:`klip_med.sampling.attribution.DenoisedAttribution`; one
  extra network forward per step);
- ``klip_t``: a t-statistic of the per-sample maps, ``mean / (std / sqrt(S))`` per pixel: KL that every
  posterior sample puts at a pixel, rather than a few (no extra cost).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from klip_med.errors import expect
from klip_med.eval.names import READOUTS
from klip_med.score import KLIPAccumulator
T_FLOOR = 1e-12
"""Added to the standard error of the t-statistic (a pixel with no KL in any sample gets 0)."""


def check_readouts(readouts: Sequence[str]) -> list[str]:
    """``readouts`` sorted and without repeats, or a KLIPMedError naming the unknown ones."""
    unknown = [r for r in readouts if r not in READOUTS]
    expect(not unknown, "readouts", f"some of {list(READOUTS)}", unknown)
    return sorted(set(readouts))


def readout_observers(prior, settings, readouts: Sequence[str]) -> tuple[list, dict]:
    """The step observers the read-outs need (to run in the sampling pass) and their state.

    Args:
        settings: the run's KLIPSettings (windows, normalisation, sampler).
    """
    from klip_med.pipeline.settings import make_sampler
    from klip_med.sampling.attribution import DenoisedAttribution

    readouts = check_readouts(readouts)
    state: dict = {}
    observers: list = []
    if "denoised" in readouts:
        accumulator = KLIPAccumulator(list(settings.windows), normalization=settings.normalization)
        state["denoised"] = (accumulator, DenoisedAttribution(make_sampler(prior, settings), [accumulator]))
        observers.append(state["denoised"][1])
    return observers, state


def readout_maps(result, settings, readouts: Sequence[str], state: dict) -> tuple[dict[str, np.ndarray], int]:
    """``(maps, extra_network_calls)`` of the read-outs for one slice, after its sampling pass."""
    maps: dict[str, np.ndarray] = {}
    extra = 0
    if "denoised" in readouts:
        accumulator, attribution = state["denoised"]
        mean = accumulator.result().sample_mean().detach().cpu().numpy()
        for k, w in enumerate(settings.windows):
            maps[f"klip_dn[{w.label}]"] = mean[k].astype(np.float32)
        extra += attribution.network_calls
    if "tstat" in readouts:
        n = settings.samples
        for k, w in enumerate(settings.windows):
            sem = result.klip_sample_std[k].numpy() / math.sqrt(max(n, 1))
            maps[f"klip_t[{w.label}]"] = (result.klip[k].numpy() / (sem + T_FLOOR)).astype(np.float32)
    return maps, extra
