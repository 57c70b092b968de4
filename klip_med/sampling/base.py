"""The sampling loop shared by klip_med's posterior samplers.

Every sampler here runs the S posterior samples as one batch, draws all its randomness from the
``torch.Generator`` it is given (initial noise first, then one draw per step, in step order), and
emits exactly one :class:`~klip_med.score.events.StepEvent` per step with
``delta = x_post - x_prior``: the posterior step's output minus the prior step's output taken
from the same ``x_k`` with the same draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.sampling.prior import EpsilonPrior
from klip_med.sampling.schedule import VPSchedule
from klip_med.score.events import StepEvent, StepObserver


@dataclass(frozen=True)
class SampleResult:
    """Output of a posterior sampling run.

    Attributes:
        samples: (S, C, H, W) posterior samples, in the prior's intensity range.
        x_init: (S, C, H, W) the initial noise the run started from.
        step_sigmas: canonical noise level of each step, in sampling order.
        nfe: network evaluations per sample (forward passes; DPS adds one backward per step).
    """

    samples: Tensor
    x_init: Tensor
    step_sigmas: tuple[float, ...]
    nfe: int

    @property
    def mean(self) -> Tensor:
        """Posterior mean estimate, (1, C, H, W)."""
        return self.samples.mean(dim=0, keepdim=True)

    @property
    def std(self) -> Tensor:
        """Per-pixel posterior standard deviation across samples, (1, C, H, W); zeros if S=1."""
        if self.samples.shape[0] < 2:
            return torch.zeros_like(self.samples[:1])
        return self.samples.std(dim=0, keepdim=True)


@dataclass(frozen=True)
class StepPlan:
    """Constants of one respaced DDPM/DDIM step from training timestep ``t`` to ``t_next``.

    ``t_next = -1`` on the last step (the clean end, ``alpha_bar = 1``). ``beta`` is the respaced
    step's ``1 - alpha_bar_t / alpha_bar_next``; ``posterior_var`` DDPM's ``beta_tilde``;
    ``g = sqrt(beta_train[t])`` and ``dt = t - t_next`` describe the step for the SDE / paper
    normalisations (``g**2 * dt`` approximates ``beta``).
    """

    index: int
    t: int
    t_next: int
    alpha_bar: float
    alpha_bar_next: float
    sigma: float
    g: float
    dt: float

    @property
    def beta(self) -> float:
        return 1.0 - self.alpha_bar / self.alpha_bar_next

    @property
    def posterior_var(self) -> float:
        return (1.0 - self.alpha_bar_next) / (1.0 - self.alpha_bar) * self.beta


def plan_steps(schedule: VPSchedule, n_steps: int) -> list[StepPlan]:
    """The respaced steps of a run, in sampling order."""
    ts = schedule.respaced_timesteps(n_steps)
    plans = []
    for k, t in enumerate(ts):
        t_next = ts[k + 1] if k + 1 < len(ts) else -1
        plans.append(
            StepPlan(
                index=k,
                t=t,
                t_next=t_next,
                alpha_bar=schedule.alpha_bar(t),
                alpha_bar_next=schedule.alpha_bar(t_next),
                sigma=schedule.sigma(t),
                g=math.sqrt(float(schedule.betas[t])),
                dt=float(t - t_next),
            )
        )
    return plans


def check_measurement_fits(y: Tensor, physics, image_shape: tuple[int, ...]) -> None:
    """Raise :class:`KLIPMedError` for NaN / Inf measurements or a physics / image mismatch.

    Works for any deepinv ``Physics`` (the sampler cannot assume a klip_med operator);
    :func:`klip_med.physics.check_measurement` is the stricter twin for klip_med's own operators.
    """
    if not isinstance(y, Tensor):
        raise KLIPMedError(f"y: expected a torch.Tensor measurement, found {type(y).__name__}")
    if not bool(torch.isfinite(y).all()):
        bad = int((~torch.isfinite(y)).sum())
        raise KLIPMedError(f"y: expected finite measurements, found {bad} NaN / Inf values")
    probe = torch.zeros((1, *image_shape), dtype=torch.float32, device=y.device)
    try:
        expected = tuple(physics.A(probe).shape[1:])
    except KLIPMedError:
        raise
    except Exception as exc:  # deepinv raises many types on size mismatch
        raise KLIPMedError(
            f"physics: expected an operator accepting images of shape (S, {', '.join(map(str, image_shape))}), "
            f"found it fails on that shape ({type(exc).__name__}: {exc})"
        ) from exc
    if tuple(y.shape[1:]) != expected:
        raise KLIPMedError(
            f"y: expected measurement of shape (1 or S, {', '.join(map(str, expected))}) for "
            f"images of shape {image_shape}, found {tuple(y.shape)}"
        )


class PosteriorSampler:
    """Base class: a respaced VP posterior sampler over an :class:`EpsilonPrior`.

    Subclasses implement :meth:`_step`.

    Args:
        prior: the epsilon-prediction prior.
        n_steps: number of sampling steps (<= the prior's training timesteps).
        clip_x0: optional (lo, hi) range the denoised estimate is clipped to (the prior's data
            range; DPS's ``clip_denoised``). ``None`` for no clipping.
    """

    nfe_per_step = 1

    def __init__(
        self,
        prior: EpsilonPrior,
        n_steps: int,
        clip_x0: tuple[float, float] | None = None,
    ) -> None:
        if not hasattr(prior, "eps") or not hasattr(prior, "alphas_cumprod"):
            raise KLIPMedError(
                "prior: expected an EpsilonPrior (an eps(x_t, t) method and alphas_cumprod), "
                f"found {type(prior).__name__}"
            )
        self.prior = prior
        self.schedule = VPSchedule(prior.alphas_cumprod)
        self.plans = plan_steps(self.schedule, n_steps)
        self.clip_x0 = clip_x0

    @property
    def n_steps(self) -> int:
        return len(self.plans)

    @property
    def step_sigmas(self) -> tuple[float, ...]:
        """Canonical noise level of each step's input, in sampling order."""
        return tuple(p.sigma for p in self.plans)

    # -- pieces shared by subclasses -------------------------------------------------------
    def _eps(self, x: Tensor, plan: StepPlan) -> Tensor:
        t = torch.full((x.shape[0],), float(plan.t), dtype=torch.float32, device=x.device)
        return self.prior.eps(x, t)

    def denoise(self, x: Tensor, eps: Tensor, plan: StepPlan) -> Tensor:
        """Tweedie estimate ``x0_hat = (x - sqrt(1 - a) eps) / sqrt(a)``, clipped if asked."""
        a = plan.alpha_bar
        x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        if self.clip_x0 is not None:
            x0 = x0.clamp(*self.clip_x0)
        return x0

    @staticmethod
    def ddpm_mean(x: Tensor, x0: Tensor, plan: StepPlan) -> Tensor:
        """Mean of DDPM's reverse kernel q(x_{t_next} | x_t, x0) for the respaced step."""
        a, a_next, beta = plan.alpha_bar, plan.alpha_bar_next, plan.beta
        c0 = math.sqrt(a_next) * beta / (1.0 - a)
        cx = math.sqrt(1.0 - beta) * (1.0 - a_next) / (1.0 - a)
        return c0 * x0 + cx * x

    def prior_transition(self, x: Tensor, plan: StepPlan, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The unconditional sampler's step from ``x`` with draw ``z``.

        Returns ``(x_prior, x0_hat, eps)``. Subclasses with another prior transition override it.
        """
        with torch.no_grad():
            eps = self._eps(x, plan)
        x0 = self.denoise(x, eps, plan)
        return self.ddpm_mean(x, x0, plan) + math.sqrt(plan.posterior_var) * z, x0, eps

    def noise_std(self, plan: StepPlan) -> float:
        """``s_k`` of the prior transition (DDPM: ``sqrt(beta_tilde)``)."""
        return math.sqrt(plan.posterior_var)

    def _step(
        self, x: Tensor, plan: StepPlan, z: Tensor, y: Tensor, physics
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One posterior step: returns ``(x_prior, x_post, x0_hat)``."""
        raise NotImplementedError

    # -- the loop ----------------------------------------------------------------------------
    def sample(
        self,
        y: Tensor,
        physics,
        n_samples: int,
        image_shape: tuple[int, int, int],
        generator: torch.Generator,
        observers: Sequence[StepObserver] = (),
        x_init: Tensor | None = None,
    ) -> SampleResult:
        """Draw ``n_samples`` posterior samples given measurement ``y``.

        Args:
            y: measurement, shape (1, ...) or (S, ...) as produced by ``physics``.
            physics: a ``deepinv.physics.LinearPhysics`` (``A``, ``A_adjoint``; ``prox_l2`` for
                proximal samplers) on images of ``image_shape``.
            n_samples: S, the number of posterior samples, run as one batch.
            image_shape: (C, H, W) of the prior's images.
            generator: the only source of randomness (initial noise, then one draw per step).
            observers: called once per step with that step's :class:`StepEvent`.
            x_init: optional (S, C, H, W) starting noise (the generator still draws it first, so
                the per-step draws do not depend on whether it is given).
        """
        if not isinstance(n_samples, int) or n_samples < 1:
            raise KLIPMedError(f"n_samples: expected an integer >= 1, found {n_samples!r}")
        if not isinstance(generator, torch.Generator):
            raise KLIPMedError(
                f"generator: expected a torch.Generator, found {type(generator).__name__}"
            )
        image_shape = tuple(int(v) for v in image_shape)
        check_measurement_fits(y, physics, image_shape)
        if y.shape[0] not in (1, n_samples):
            raise KLIPMedError(
                f"y: expected a batch of 1 or n_samples={n_samples} measurements, found {y.shape[0]}"
            )
        y = y.expand(n_samples, *y.shape[1:])
        shape = (n_samples, *image_shape)
        device = y.device
        drawn = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if x_init is not None:
            if tuple(x_init.shape) != shape:
                raise KLIPMedError(f"x_init: expected shape {shape}, found {tuple(x_init.shape)}")
            drawn = x_init.to(device=device, dtype=torch.float32)
        x = drawn
        for plan in self.plans:
            z = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            x_prior, x_post, x0_hat = self._step(x, plan, z, y, physics)
            x_post = x_post.detach()
            event = StepEvent(
                index=plan.index,
                sigma=plan.sigma,
                # a fill kernel, not torch.tensor(...): a host-to-device copy would sync every step
                noise_std=torch.full((), self.noise_std(plan), dtype=torch.float32, device=device),
                delta=x_post - x_prior.detach(),
                x=x_post,
                x0_hat=x0_hat.detach(),
                g=plan.g,
                dt=plan.dt,
            )
            for observe in observers:
                observe(event)
            x = x_post
        return SampleResult(
            samples=x,
            x_init=drawn,
            step_sigmas=self.step_sigmas,
            nfe=self.n_steps * self.nfe_per_step,
        )
