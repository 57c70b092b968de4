"""Windows of diffusion time on the canonical noise-level axis.

A window is a half-open interval ``[sigma_min, sigma_max)`` of the canonical noise level ``sigma`` of
the step's input (DESIGN.md section 2): ``sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` for a
variance-preserving prior. That axis does not depend on the backbone's parameterisation or on the
number of sampling steps, so the same window means the same thing for any sampler. Helpers convert
from normalised time ``t / (T - 1)`` and from step indices of a given run.

Half-open windows partition the steps: adjacent windows (``t:0.1,0.2`` and ``t:0.2,0.3``) share an edge
but never a step. A window reaching the top of the schedule (``sigma_max = inf``, e.g. ``t:a,1`` and
``full``) holds every step above ``sigma_min``.

Normalised time: ``u = t / (T - 1)`` for the training timesteps ``t = 0 .. T - 1`` of a prior with T
of them, so ``u = 0`` is the clean end and ``u = 1`` the noisiest training timestep
(:func:`normalized_time`); ``t:a,b`` windows and every ``t/(T-1)`` option of klip_med use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from klip_med.errors import KLIPMedError


@dataclass(frozen=True)
class Window:
    """A half-open interval of canonical noise level: a step belongs when sigma_min <= sigma < sigma_max
    (every sigma >= sigma_min when sigma_max is ``inf``).

    Args:
        sigma_min: lower edge (>= 0).
        sigma_max: upper edge (>= sigma_min); ``math.inf`` for "up to the noisiest step".
        name: optional label used in outputs (defaults to the interval written out).
    """

    sigma_min: float
    sigma_max: float
    name: str | None = None

    def __post_init__(self) -> None:
        for field in ("sigma_min", "sigma_max"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or math.isnan(value):
                raise KLIPMedError(f"Window.{field}: expected a number, found {value!r}")
        if self.sigma_min < 0:
            raise KLIPMedError(f"Window.sigma_min: expected >= 0, found {self.sigma_min}")
        if self.sigma_max < self.sigma_min:
            raise KLIPMedError(
                f"Window.sigma_max: expected >= sigma_min ({self.sigma_min}), found {self.sigma_max}"
            )

    def contains(self, sigma: float) -> bool:
        """Whether a step at canonical noise level ``sigma`` belongs to the window."""
        return self.sigma_min <= sigma < self.sigma_max or (math.isinf(self.sigma_max) and sigma >= self.sigma_min)

    @property
    def label(self) -> str:
        """The window's name, or ``"sigma[lo,hi]"``."""
        return self.name or f"sigma[{self.sigma_min:.4g},{self.sigma_max:.4g}]"

    def as_dict(self) -> dict:
        """JSON-ready description, the one serialisation of a window (outputs, settings, null
        models): ``{"name", "sigma_min", "sigma_max"}``, ``sigma_max`` None when unbounded."""
        return {"name": self.label, "sigma_min": float(self.sigma_min),
                "sigma_max": None if math.isinf(self.sigma_max) else float(self.sigma_max)}


FULL = Window(0.0, math.inf, name="full")
"""The window that holds every step."""


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Canonical noise levels ``sqrt((1 - a) / a)`` of a VP schedule, shape (T,), float64 on CPU."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    return ((1.0 - a) / a).sqrt()


def normalized_time(timestep: float, n_train_steps: int) -> float:
    """``u = t / (T - 1)``: a training timestep ``t`` (0 .. T - 1) on the normalised axis [0, 1]."""
    if n_train_steps < 2:
        raise KLIPMedError(f"n_train_steps: expected at least 2 training timesteps, found {n_train_steps}")
    return float(timestep) / (n_train_steps - 1)


def timestep_at(u: float, n_train_steps: int) -> float:
    """The inverse of :func:`normalized_time`: ``t = u * (T - 1)`` (fractional between timesteps)."""
    if not 0.0 <= u <= 1.0:
        raise KLIPMedError(f"normalised time: expected a value in [0, 1], found {u}")
    return float(u) * (n_train_steps - 1)


def window_from_normalized_time(
    t_start: float, t_end: float, alphas_cumprod: Tensor, name: str | None = None
) -> Window:
    """Window covering normalised diffusion times ``u = t / (T - 1)`` in ``[t_start, t_end)`` of a VP
    schedule (``t_end = 1`` closes it at the top).

    ``u = 0`` is the clean end, ``1`` the noisiest training timestep (:func:`normalized_time`).
    Fractional timesteps are placed on the schedule by linear interpolation of ``log sigma`` between
    integer timesteps.

    Args:
        t_start, t_end: normalised times, ``0 <= t_start <= t_end <= 1``.
        alphas_cumprod: the prior's training schedule ``alpha_bar_t``, shape (T,).
    """
    for arg, value in (("t_start", t_start), ("t_end", t_end)):
        if not 0.0 <= value <= 1.0:
            raise KLIPMedError(f"{arg}: expected a normalised time in [0, 1], found {value}")
    if t_end < t_start:
        raise KLIPMedError(f"t_end: expected >= t_start ({t_start}), found {t_end}")
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    log_sigmas = sigmas.log()
    steps = log_sigmas.numel() - 1

    def sigma_at(frac: float) -> float:
        pos = timestep_at(frac, steps + 1)
        lo = min(int(math.floor(pos)), steps)
        hi = min(lo + 1, steps)
        w = pos - lo
        if w == 0.0:  # exactly a training timestep: its sigma, not exp(log(sigma)) one ulp away
            return float(sigmas[lo])
        return float(torch.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]))

    # The ends of [0, 1] are open-ended on the sigma axis, so t/(T-1) = 0 and 1 always hold the
    # clean-end and the noisiest steps of any respacing.
    lo = 0.0 if t_start == 0.0 else sigma_at(t_start)
    hi = math.inf if t_end == 1.0 else sigma_at(t_end)
    return Window(lo, hi, name=name)


def window_from_step_indices(
    first: int, last: int, step_sigmas: Sequence[float], name: str | None = None
) -> Window:
    """Window holding exactly steps ``first .. last`` (inclusive, sampling order) of a run: from the
    last step's sigma up to (not including) the sigma of the step before ``first`` (open-ended when
    ``first`` is the run's first step).

    Args:
        first, last: step indices, ``0 <= first <= last < len(step_sigmas)``.
        step_sigmas: canonical noise level of each step of the run, in sampling order
            (samplers expose it as ``step_sigmas``).
    """
    n = len(step_sigmas)
    if not (0 <= first <= last < n):
        raise KLIPMedError(
            f"step indices: expected 0 <= first <= last < {n} (the run's number of steps), "
            f"found first={first}, last={last}"
        )
    chosen = [float(s) for s in step_sigmas[first : last + 1]]
    upper = math.inf if first == 0 else float(step_sigmas[first - 1])
    if upper <= max(chosen):
        raise KLIPMedError(f"step_sigmas: expected strictly decreasing noise levels, found {step_sigmas[first - 1]} "
                           f"before {max(chosen)}")
    return Window(min(chosen), upper, name=name)


def check_windows_cover_steps(windows: Sequence[Window], step_sigmas: Sequence[float], argument: str = "windows",
                              hint: str = "") -> None:
    """Raise :class:`KLIPMedError` for any window that holds none of a run's steps.

    Call before sampling so that a window outside the schedule is reported before any network
    evaluation is spent. This is the one coverage check of klip_med.

    Args:
        argument: what the windows were given as, for the message (e.g. ``"--windows"``).
        hint: appended to the message (e.g. how to fix it on the command line).
    """
    if not step_sigmas:
        raise KLIPMedError("step_sigmas: expected at least one sampling step, found none")
    lo, hi = min(step_sigmas), max(step_sigmas)
    for i, window in enumerate(windows):
        if not any(window.contains(float(s)) for s in step_sigmas):
            raise KLIPMedError(
                f"{argument}[{i}] ({window.label}): expected a window holding at least one of the "
                f"{len(step_sigmas)} sampling steps (their sigma spans [{lo:.4g}, {hi:.4g}]), "
                f"found none inside it{hint}"
            )
