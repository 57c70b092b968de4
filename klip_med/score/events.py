"""The step event: the one extension point between samplers and the KLIP estimator.

A posterior sampler step ``k`` goes from ``x_k`` to ``x_{k-1}``. Written as the prior's own
transition plus a data-consistency change (DESIGN.md section 2)::

    x_prior = m_k(x_k) + s_k * z      # what the unconditional sampler does with the same draw z
    x_post  = x_prior + d_k           # what the posterior sampler actually does

Each sampler reports ``d_k`` and ``s_k`` through one :class:`StepEvent` per step; anything that
wants per-step data (the KLIP accumulator, a progress bar, a trajectory recorder) is a
:class:`StepObserver`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class StepEvent:
    """What one posterior sampling step reports.

    Attributes:
        index: step number, 0 .. n_steps-1, in sampling order (0 is the noisiest step).
        sigma: canonical noise level of the step's input ``x_k``: for a variance-preserving
            prior ``sqrt((1 - alpha_bar_t) / alpha_bar_t)``, for VE / EDM priors ``sigma(t)``.
            A Python float, so observers can place the step in a window without a device sync.
        noise_std: ``s_k``, the standard deviation of the Gaussian noise the step injects, in the
            sampler's state units; a 0-d tensor or one value per posterior sample, shape (S,).
            Zero for a deterministic step.
        delta: ``d_k``, posterior step output minus prior step output with the same random draw,
            shape (S, C, H, W), in the sampler's state units.
        x: the iterate after the step, ``x_{k-1}``, shape (S, C, H, W). Read-only.
        x0_hat: the prior's denoised estimate at this step, shape (S, C, H, W), when the sampler
            has one; else ``None``.
        g: the diffusion coefficient ``g(t_k)`` of the underlying SDE per unit of ``dt``
            (``sqrt(beta_t)`` of the training schedule for DDPM, per training timestep). Used by
            the ``paper`` normalisation (the reference implementation divides ``d_k`` by it) and,
            with ``dt``, by the ``sde`` normalisation. ``None`` when the sampler cannot say.
        dt: the step length in the units of ``g`` (number of training timesteps the step spans
            for DDPM), so that ``g**2 * dt`` is the variance an SDE step of this length injects.
    """

    index: int
    sigma: float
    noise_std: Tensor
    delta: Tensor
    x: Tensor
    x0_hat: Tensor | None = None
    g: float | None = None
    dt: float | None = None


@runtime_checkable
class StepObserver(Protocol):
    """Anything called once per sampling step with that step's :class:`StepEvent`.

    Observers must not modify the event's tensors.
    """

    def __call__(self, event: StepEvent) -> None: ...
