"""KLIP on deepinv's ``PosteriorDiffusion``: its SDE solvers emit one StepEvent per step.

``PosteriorDiffusion`` (and its subclass ``deepinv.sampling.DPS``) runs a solver on the posterior
reverse SDE, whose score is the prior score plus a noisy data fidelity (``DPSDataFidelity``,
``PiGDMDataFidelity``, ``MomentMatchingDataFidelity``, ``ScoreSDEDataFidelity``, ...). Nothing of
deepinv is forked: each solver here subclasses deepinv's own (``EulerSolver``, ``HeunSolver``,
``AncestralSolver`` and so DDPM / DDIM) and, after deepinv's posterior step, runs deepinv's *same*
step formula again on the unconditional SDE (``PosteriorDiffusion.sde``) with the *same* noise draw
(the solver's ``randn_like`` is replayed). The event carries

- ``delta = x_post - x_prior`` (the posterior step minus the prior step under the same draw);
- ``noise_std``: the std the step injects, read off deepinv's step itself (the step run from
  ``x = 0`` on the SDE with zero drift and zero score, with unit noise), so it is right for every
  solver, ``eta``, ``alpha`` and ``variance="large"``;
- ``sigma``: the SDE's ``sigma(t)`` at the step's start (the canonical noise level for VP and VE);
- ``g``, ``dt``: the forward SDE's diffusion coefficient and the step length, for the SDE
  normalisation of deterministic steps (``alpha = 0``, DDIM ``eta = 0``) and the paper's.

Cost: one extra network forward pass per step for the prior step (two for Heun); deepinv's
posterior step is unchanged, so the samples are bit-for-bit deepinv's.

Heun's step is not a Gaussian kernel (its second drift depends on the draw); its ``noise_std`` is
the injected ``(g(t0) + g(t1)) / 2 * sqrt(dt)`` and its KL the same-draw estimate, not exact.

Pinned: deepinv 0.5.x (``BaseSDESolver.step`` / ``randn_like`` / ``PosteriorDiffusion`` signatures).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import deepinv as dinv
import torch
from deepinv.sampling import AncestralSolver, EulerSolver, HeunSolver, PosteriorDiffusion
from torch import Tensor

from klip_med.errors import KLIPMedError, expect
from klip_med.sampling.deepinv_adapter import EpsilonDenoiser
from klip_med.sampling.prior import EpsilonPrior
from klip_med.sampling.schedule import VPSchedule
from klip_med.score.events import StepEvent, StepObserver

SOLVERS = ("ddpm", "ddim", "ancestral", "euler", "heun")
"""Solver names :func:`posterior_diffusion` builds (deepinv's ``DDPMSolver``, ``DDIMSolver``,
``AncestralSolver``, ``EulerSolver``, ``HeunSolver``)."""
FIDELITIES = ("dps", "dps-annealed", "pigdm", "moment-matching", "score-sde")
"""Data-fidelity names :func:`posterior_diffusion` builds."""


class _NoiseOnly:
    """An SDE with the prior's schedule and zero drift / zero score.

    A solver step from ``x = 0`` with unit noise on it returns exactly the noise std the step injects.
    """

    def __init__(self, sde) -> None:
        self.sigma_t, self.scale_t, self.alpha, self.diffusion = sde.sigma_t, sde.scale_t, sde.alpha, sde.diffusion

    def score(self, x: Tensor, t, *args, **kwargs) -> Tensor:
        return torch.zeros_like(x)

    def discretize(self, x: Tensor, t, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), self.diffusion(t)


class _Observing:
    """Mixin put before a deepinv solver class: replays the noise draw on the prior SDE, emits events."""

    def _observe(self, prior_sde, observers: Sequence[StepObserver], train_steps: int | None) -> None:
        expect(prior_sde is not None and hasattr(prior_sde, "sigma_t"), "prior_sde",
               "the unconditional deepinv SDE (PosteriorDiffusion.sde)", type(prior_sde).__name__)
        expect(train_steps is None or (isinstance(train_steps, int) and train_steps > 0), "train_steps",
               "None or the prior's number of training timesteps (an integer > 0)", train_steps)
        self.prior_sde = prior_sde
        self.observers = tuple(observers)
        self.train_steps = train_steps
        self.index = 0
        self.replay: Tensor | None = None
        self.drawn: Tensor | None = None

    def randn_like(self, input: Tensor, seed: int | None = None) -> Tensor:
        if self.replay is not None:
            return self.replay
        self.drawn = super().randn_like(input, seed)
        return self.drawn

    def sample(self, sde, x_init, *args, **kwargs):
        self.index = 0
        return super().sample(sde, x_init, *args, **kwargs)

    def _replayed(self, sde, t0, t1, x0: Tensor, noise: Tensor) -> tuple[Tensor, int]:
        self.replay = noise
        try:
            return super().step(sde, t0, t1, x0)
        finally:
            self.replay = None

    def step(self, sde, t0, t1, x0: Tensor, *args, **kwargs):
        self.drawn = None
        x_post, nfe = super().step(sde, t0, t1, x0, *args, **kwargs)
        drawn = self.drawn if self.drawn is not None else torch.zeros_like(x0)
        x_prior, prior_nfe = self._replayed(self.prior_sde, t0, t1, x0, drawn)
        unit, _ = self._replayed(_NoiseOnly(self.prior_sde), t0, t1, torch.zeros_like(x0), torch.ones_like(x0))
        dt = float(abs(t1 - t0))
        g = getattr(self.prior_sde, "forward_diffusion", None)
        g = None if g is None else float(g(t0))
        if g is not None and self.train_steps is not None:  # per training timestep, as DDPM's sqrt(beta_t)
            g, dt = g / math.sqrt(self.train_steps), dt * self.train_steps
        event = StepEvent(
            index=self.index,
            sigma=float(self.prior_sde.sigma_t(t0)),
            noise_std=unit.flatten(1)[:, 0].detach().to(torch.float32),
            delta=(x_post - x_prior).detach().to(torch.float32),
            x=x_post.detach().to(torch.float32),
            x0_hat=None,
            g=g,
            dt=dt,
        )
        for observe in self.observers:
            observe(event)
        self.index += 1
        return x_post, nfe + prior_nfe


class ObservedEulerSolver(_Observing, EulerSolver):
    """deepinv's Euler-Maruyama solver, emitting one StepEvent per step.

    Args:
        timesteps, rng: as for ``deepinv.sampling.EulerSolver``.
        prior_sde: the unconditional SDE (``PosteriorDiffusion.sde``) the prior step runs on.
        observers: called once per step.
        train_steps: the prior's training timesteps; events then carry ``g`` per training timestep and
            ``dt`` in training timesteps (the DDPM units of the paper normalisation). None: SDE time units.
    """

    def __init__(self, timesteps: Tensor, prior_sde, observers: Sequence[StepObserver] = (),
                 rng: torch.Generator | None = None, train_steps: int | None = None) -> None:
        super().__init__(timesteps=timesteps, rng=rng)
        self._observe(prior_sde, observers, train_steps)


class ObservedHeunSolver(_Observing, HeunSolver):
    """deepinv's Heun solver, emitting one StepEvent per step (arguments as :class:`ObservedEulerSolver`)."""

    def __init__(self, timesteps: Tensor, prior_sde, observers: Sequence[StepObserver] = (),
                 rng: torch.Generator | None = None, train_steps: int | None = None) -> None:
        super().__init__(timesteps=timesteps, rng=rng)
        self._observe(prior_sde, observers, train_steps)


class ObservedSDEAncestralSolver(_Observing, AncestralSolver):
    """deepinv's ancestral solver (DDPM for ``eta = 1``, DDIM for ``eta = 0``, the SDE's ``alpha`` for
    ``eta = None``), emitting one StepEvent per step; other arguments as :class:`ObservedEulerSolver`."""

    def __init__(self, timesteps: Tensor, prior_sde, observers: Sequence[StepObserver] = (),
                 rng: torch.Generator | None = None, train_steps: int | None = None,
                 eta: float | None = None, variance: str = "small") -> None:
        super().__init__(timesteps=timesteps, eta=eta, variance=variance, rng=rng)
        self._observe(prior_sde, observers, train_steps)


def observed_solver(solver, prior_sde, observers: Sequence[StepObserver] = (),
                    train_steps: int | None = None):
    """An observing copy of a deepinv SDE solver: same class family, time steps, ``rng`` (shared, so the
    draws are the same), ``eta`` and ``variance``. The given solver is not modified."""
    common = {"timesteps": solver.timesteps, "prior_sde": prior_sde, "observers": observers,
              "rng": solver.rng, "train_steps": train_steps}
    if isinstance(solver, AncestralSolver):
        return ObservedSDEAncestralSolver(eta=solver.eta, variance=solver.variance, **common)
    if type(solver) is EulerSolver or isinstance(solver, ObservedEulerSolver):
        return ObservedEulerSolver(**common)
    if type(solver) is HeunSolver or isinstance(solver, ObservedHeunSolver):
        return ObservedHeunSolver(**common)
    raise KLIPMedError(
        "solver: expected deepinv's EulerSolver, HeunSolver or AncestralSolver (DDPMSolver, DDIMSolver), "
        f"found {type(solver).__name__}"
    )


def observe_posterior_diffusion(model: PosteriorDiffusion, observers: Sequence[StepObserver],
                                train_steps: int | None = None) -> PosteriorDiffusion:
    """deepinv's posterior sampler with KLIP observers attached; the given model is not modified.

    Returns a shallow copy of ``model`` (sharing its denoiser, SDE and data fidelity) whose solver is
    :func:`observed_solver` of the model's. Works for ``PosteriorDiffusion`` and its subclasses
    (``deepinv.sampling.DPS``). Its samples equal the original's for the same ``rng`` state.
    """
    expect(isinstance(model, PosteriorDiffusion), "model", "a deepinv.sampling.PosteriorDiffusion",
           type(model).__name__)
    solver = observed_solver(model.solver, model.sde, observers, train_steps)
    observed = copy.copy(model)
    observed._modules = dict(model._modules)  # nn.Module keeps children in this dict: do not share it
    observed.solver = solver
    return observed


def _fidelity(name: str, weight: float, rng: torch.Generator | None, cg_max_iter: int):
    expect(name in FIDELITIES, "fidelity", f"one of {FIDELITIES}", name)
    if name in ("dps", "dps-annealed"):
        return dinv.sampling.DPSDataFidelity(weight=weight, guidance="norm" if name == "dps" else "annealed")
    if name == "pigdm":
        return dinv.sampling.PiGDMDataFidelity(weight=weight, cg_max_iter=cg_max_iter)
    if name == "moment-matching":
        return dinv.sampling.MomentMatchingDataFidelity(weight=weight, cg_max_iter=cg_max_iter, cg_tol=1e-6)
    # its own stream (seeded next to the solver's), so re-noising y does not shift the solver's draws
    own = None if rng is None else torch.Generator(device=rng.device).manual_seed(rng.initial_seed() + 1)
    return dinv.sampling.ScoreSDEDataFidelity(weight=weight, rng=own)


def posterior_diffusion(
    prior: EpsilonPrior,
    n_steps: int,
    observers: Sequence[StepObserver] = (),
    *,
    fidelity: str = "dps-annealed",
    weight: float = 1.0,
    solver: str = "ddpm",
    generator: torch.Generator | None = None,
    alpha: float = 1.0,
    eta: float | None = None,
    cg_max_iter: int = 20,
    dtype: torch.dtype = torch.float64,
) -> PosteriorDiffusion:
    """deepinv's ``PosteriorDiffusion`` on our prior (VP SDE, the prior's [-1, 1] range), observed.

    Args:
        prior: epsilon-prediction VP prior; it becomes a deepinv denoiser (:class:`EpsilonDenoiser`).
        n_steps: solver steps (the time grid has ``n_steps + 1`` points from 1 down to 0, or to 1e-3 for
            Euler / Heun, as in deepinv's ``DPS``).
        observers: called once per step.
        fidelity: one of :data:`FIDELITIES`: deepinv's ``DPSDataFidelity`` (residual-norm or annealed
            guidance), ``PiGDMDataFidelity``, ``MomentMatchingDataFidelity`` (exact for a Gaussian prior
            with its exact denoiser), ``ScoreSDEDataFidelity`` (re-noises ``y`` from its own generator,
            seeded ``generator.initial_seed() + 1``).
            The physics must carry a Gaussian noise model for ``pigdm`` / ``moment-matching``.
        weight: the data fidelity's ``weight`` (0 gives the unconditional sampler).
        solver: one of :data:`SOLVERS`.
        generator: the solver's ``rng`` (initial noise and step noise).
        alpha: the SDE's noise weight (1: DDPM-like, 0: probability-flow ODE); ``ddpm`` / ``ddim``
            ignore it.
        eta: DDIM stochasticity for ``ddim`` / ``ancestral`` (None: ``ddim`` 0, ``ancestral`` the SDE's alpha).
        cg_max_iter: conjugate-gradient iterations of PiGDM / moment matching.
        dtype: the solver's dtype (the denoiser runs in float32).

    Returns:
        the model; call it as ``model(y, physics, x_init=(S, C, H, W))`` (``y`` in the prior's units).
    """
    expect(hasattr(prior, "eps") and hasattr(prior, "alphas_cumprod"), "prior",
           "an EpsilonPrior (an eps(x_t, t) method and alphas_cumprod)", type(prior).__name__)
    expect(isinstance(n_steps, int) and n_steps >= 1, "n_steps", "an integer >= 1", n_steps)
    expect(solver in SOLVERS, "solver", f"one of {SOLVERS}", solver)
    T = VPSchedule(prior.alphas_cumprod).num_train_timesteps
    denoiser = EpsilonDenoiser(prior, keep_calls=False)
    sde = dinv.sampling.VariancePreservingDiffusion(alpha=alpha, dtype=dtype)
    end = 1e-3 if solver in ("euler", "heun") else 0.0
    timesteps = torch.linspace(1.0, end, n_steps + 1, dtype=dtype)
    common = {"timesteps": timesteps, "prior_sde": sde, "observers": observers, "rng": generator,
              "train_steps": T}
    if solver == "euler":
        chosen = ObservedEulerSolver(**common)
    elif solver == "heun":
        chosen = ObservedHeunSolver(**common)
    else:
        eta = {"ddpm": 1.0, "ddim": 0.0 if eta is None else eta, "ancestral": eta}[solver]
        chosen = ObservedSDEAncestralSolver(eta=eta, **common)
    data_fidelity = _fidelity(fidelity, weight, generator, cg_max_iter)
    return PosteriorDiffusion(data_fidelity=data_fidelity, denoiser=denoiser, sde=sde, solver=chosen,
                              dtype=dtype, minus_one_one=False)
