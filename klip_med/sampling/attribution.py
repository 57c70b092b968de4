"""Where in the image a step's KL is put: the denoiser's attribution.

The KL of a step, ``||d_k||^2 / (2 s_k^2)``, is exact; how it is split over pixels is a choice
(DESIGN.md section 2). The default split ``d_k(i)^2 / (2 s_k^2)`` puts it where the data-consistency
correction lands, and that correction lies in the range of ``A^H``: under Cartesian undersampling a
lesion's correction is smeared along the phase-encoding direction, under sparse-view CT along the
FBP streaks.

:class:`DenoisedAttribution` splits the same KL by where the prior's denoiser, at the next noise
level, moves the image when the correction is applied:

    g_k = D_{t_{k+1}}(x_post) - D_{t_{k+1}}(x_prior),    KL_k(i) = KL_k * g_k(i)^2 / ||g_k||^2

(per sample). The denoiser keeps what looks like anatomy and removes implausible aliasing ghosts, so
``g_k`` follows the lesion rather than the operator's point-spread function. It re-emits every event
with ``delta`` replaced by ``e_k = ||d_k|| g_k / ||g_k||``: same norm, so any KLIP accumulator
downstream gets exactly the same KL per step, window and sample; only its split over pixels changes.

``D_{t_{k+1}}(x_post)`` is the next step's own denoised estimate (``event.x0_hat`` of step k + 1),
so the cost is one extra network forward per step, for ``D_{t_{k+1}}(x_prior)``. The last step lands
on the clean image, where the denoiser is the identity: its ``g`` is ``d`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from klip_med.errors import expect
from klip_med.score.events import StepEvent, StepObserver


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))


def redistribute(delta: Tensor, direction: Tensor) -> Tensor:
    """``||delta|| * direction / ||direction||`` per sample (``delta`` itself where ``direction`` is 0):
    the same squared norm per sample as ``delta``, the spatial distribution of ``direction``."""
    norm_d, norm_g = _per_sample_norm(delta), _per_sample_norm(direction)
    safe = torch.where(norm_g > 0, norm_g, torch.ones_like(norm_g))
    return torch.where(norm_g > 0, direction * (norm_d / safe), delta)


class DenoisedAttribution:
    """A step observer that re-attributes each step's KL by the denoiser (module docstring) and
    passes the re-attributed events to ``observers`` (e.g. a :class:`~klip_med.score.KLIPAccumulator`).

    Args:
        sampler: the sampler being observed (its ``plans``, ``prior`` and ``denoise``: a
            :class:`~klip_med.sampling.base.PosteriorSampler`).
        observers: where the re-attributed events go, in order.

    Events arrive one step late (step k is re-emitted when step k + 1 arrives, whose denoised
    estimate it needs); the last step is emitted at once. ``network_calls`` counts the extra forwards.
    """

    def __init__(self, sampler, observers: Sequence[StepObserver]) -> None:
        self.sampler = sampler
        self.observers = list(observers)
        self.network_calls = 0
        self._pending: tuple[StepEvent, Tensor] | None = None

    def _emit(self, event: StepEvent, direction: Tensor) -> None:
        out = replace(event, delta=redistribute(event.delta, direction))
        for observe in self.observers:
            observe(out)

    def _denoise_next(self, x: Tensor, index: int) -> Tensor:
        plan, following = self.sampler.plans[index], self.sampler.plans[index + 1]  # x is the next step's input
        expect(following.t == plan.t_next, "sampler plans", "consecutive steps (each starts where the last ended)",
               f"step {index} ends at t={plan.t_next}, step {index + 1} starts at t={following.t}")
        t = torch.full((x.shape[0],), float(following.t), dtype=torch.float32, device=x.device)
        with torch.no_grad():
            eps = self.sampler.prior.eps(x, t)
        self.network_calls += 1
        a = following.alpha_bar
        x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        return x0 if self.sampler.clip_x0 is None else x0.clamp(*self.sampler.clip_x0)

    def __call__(self, event: StepEvent) -> None:
        if self._pending is not None:
            previous, denoised_prior = self._pending
            self._pending = None
            self._emit(previous, previous.delta if event.x0_hat is None else event.x0_hat - denoised_prior)
        last = event.index + 1 >= len(self.sampler.plans)
        if last or event.x0_hat is None:
            self._emit(event, event.delta)  # the clean end: the denoiser is the identity
            return
        self._pending = (event, self._denoise_next(event.x - event.delta, event.index))
