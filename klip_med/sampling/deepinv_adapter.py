"""Run deepinv's own posterior samplers (``DPS``, ``PosteriorDiffusion``) with klip_med observers.

Nothing of deepinv is forked. Two small pieces plug into its public extension points:

- :class:`EpsilonDenoiser` turns an :class:`~klip_med.sampling.prior.EpsilonPrior` into a
  ``deepinv.models.Denoiser``: deepinv hands it ``x0 + sigma * n`` (VE form, the prior's intensity
  range) and ``sigma``; with ``alpha_bar = 1 / (1 + sigma^2)`` that is ``x_t / sqrt(alpha_bar)``,
  so ``D(x, sigma) = x - sigma * eps(sqrt(alpha_bar) x, t(sigma))``.
- :class:`ObservedAncestralSolver` subclasses ``deepinv.sampling.AncestralSolver`` (DDPM for
  ``eta = 1``, DDIM for ``eta = 0``). After deepinv's own posterior step it re-runs deepinv's
  step formula on the *prior* score with the *same* noise draw (no extra network evaluation:
  the prior score comes from the denoiser output the step already computed), and emits
  ``delta = x_post - x_prior`` as a :class:`~klip_med.score.events.StepEvent`.

Pinned: deepinv 0.5.x (``AncestralSolver.step`` / ``PosteriorDiffusion`` signatures).
"""

from __future__ import annotations

from collections.abc import Sequence

import deepinv as dinv
import torch
from deepinv.sampling import AncestralSolver
from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.sampling.prior import EpsilonPrior
from klip_med.sampling.schedule import VPSchedule
from klip_med.score.events import StepEvent, StepObserver


class EpsilonDenoiser(dinv.models.Denoiser):
    """An epsilon-prediction VP prior seen as a deepinv denoiser ``D(x0 + sigma n, sigma) -> x0``.

    It remembers its outputs (``calls``, cleared by :class:`ObservedAncestralSolver` every step) so the
    observed solver can form the prior score without a second network evaluation; ``keep_calls=False``
    remembers nothing (for samplers that never clear the list).
    """

    def __init__(self, prior: EpsilonPrior, keep_calls: bool = True) -> None:
        super().__init__()
        self.prior = prior
        self.schedule = VPSchedule(prior.alphas_cumprod)
        self.keep_calls = bool(keep_calls)
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, sigma: Tensor | float, *args, **kwargs) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        alpha_bar = 1.0 / (1.0 + sigma.to(torch.float64) ** 2)
        view = (-1,) + (1,) * (x.ndim - 1)
        x_t = (alpha_bar.sqrt().reshape(view) * x).to(torch.float32)
        t = self.schedule.continuous_timestep(sigma)
        denoised = x - sigma.reshape(view).to(x.dtype) * self.prior.eps(x_t, t).to(x.dtype)
        if self.keep_calls:
            self.calls.append((sigma.detach(), denoised.detach()))
        return denoised


class _PriorScoreView:
    """The prior's reverse SDE seen by ``AncestralSolver.step``: same schedule, prior score."""

    def __init__(self, sde, score: Tensor) -> None:
        self.sigma_t = sde.sigma_t
        self.scale_t = sde.scale_t
        self.alpha = sde.alpha
        self._score = score

    def score(self, x, t, *args, **kwargs):
        return self._score


class ObservedAncestralSolver(AncestralSolver):
    """deepinv's ancestral (DDPM / DDIM) solver, emitting one StepEvent per step.

    Args:
        denoiser: the :class:`EpsilonDenoiser` the posterior sampler uses.
        prior_sde: the unconditional deepinv SDE (``PosteriorDiffusion.sde``); its ``score`` is
            only called when the posterior step did not evaluate the denoiser exactly once.
        observers: called once per step.
        timesteps, eta, variance, rng: as for ``deepinv.sampling.AncestralSolver``.
        train_step: length of one training timestep on deepinv's time axis (``1 / T``), so that
            events carry the reference normaliser ``g = sqrt(beta(t) / T)`` and ``dt`` in
            training timesteps.
    """

    def __init__(
        self,
        denoiser: EpsilonDenoiser,
        observers: Sequence[StepObserver],
        timesteps: Tensor,
        eta: float = 1.0,
        variance: str = "small",
        rng: torch.Generator | None = None,
        train_step: float = 1e-3,
    ) -> None:
        super().__init__(timesteps=timesteps, eta=eta, variance=variance, rng=rng)
        self.denoiser = denoiser
        self.observers = tuple(observers)
        self.prior_sde = None
        self.train_step = float(train_step)
        self._index = 0
        self._replay: Tensor | None = None
        self._drawn: Tensor | None = None

    def randn_like(self, input: Tensor, seed: int | None = None) -> Tensor:
        if self._replay is not None:
            return self._replay
        self._drawn = super().randn_like(input, seed)
        return self._drawn

    def sample(self, sde, x_init, *args, **kwargs):
        self._index = 0
        return super().sample(sde, x_init, *args, **kwargs)

    def _prior_step(self, sde, t0, t1, x0: Tensor, score: Tensor, noise: Tensor) -> Tensor:
        self._replay = noise
        try:
            out, _ = super().step(_PriorScoreView(sde, score), t0, t1, x0)
        finally:
            self._replay = None
        return out

    def step(self, sde, t0, t1, x0: Tensor, *args, **kwargs):
        self.denoiser.calls.clear()
        self._drawn = None
        x_post, nfe = super().step(sde, t0, t1, x0, *args, **kwargs)
        scale, sigma = sde.scale_t(t0), sde.sigma_t(t0)
        if len(self.denoiser.calls) == 1:
            denoised = self.denoiser.calls[0][1].to(x0.dtype)
            prior_score = (scale * denoised - x0) / (scale * sigma) ** 2
        else:
            if self.prior_sde is None:
                raise KLIPMedError(
                    "ObservedAncestralSolver.prior_sde: expected the unconditional SDE when the "
                    "data fidelity does not evaluate the denoiser exactly once, found None"
                )
            prior_score = self.prior_sde.score(x0, t0).to(x0.dtype)
            nfe += 1
        noise = self._drawn if self._drawn is not None else torch.zeros_like(x0)
        x_prior = self._prior_step(sde, t0, t1, x0, prior_score, noise)
        ones = self._prior_step(sde, t0, t1, x0, prior_score, torch.ones_like(x0))
        zeros = self._prior_step(sde, t0, t1, x0, prior_score, torch.zeros_like(x0))
        noise_std = (ones - zeros).flatten(1)[:, 0].to(torch.float32)
        beta = self._beta(t0)
        event = StepEvent(
            index=self._index,
            sigma=float(sigma),
            noise_std=noise_std,
            delta=(x_post - x_prior).detach().to(torch.float32),
            x=x_post.detach(),
            x0_hat=self.denoiser.calls[0][1] if self.denoiser.calls else None,
            g=None if beta is None else float((beta * self.train_step) ** 0.5),
            dt=float(abs(t0 - t1)) / self.train_step,
        )
        for observe in self.observers:
            observe(event)
        self._index += 1
        return x_post, nfe

    def _beta(self, t):
        sde = self.prior_sde
        beta_t = getattr(sde, "beta_t", None) if sde is not None else None
        if beta_t is None and sde is not None and hasattr(sde, "forward_diffusion"):
            return float(sde.forward_diffusion(t)) ** 2
        return None if beta_t is None else float(beta_t(t))


def deepinv_dps(
    prior: EpsilonPrior,
    n_steps: int,
    observers: Sequence[StepObserver] = (),
    weight: float = 1.0,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    clip: tuple[float, float] = (-1.0, 1.0),
) -> dinv.sampling.PosteriorDiffusion:
    """deepinv's DPS on our prior, in the prior's intensity range, with our observers attached.

    Args:
        prior: epsilon-prediction VP prior (its images live in ``clip``'s range).
        n_steps: number of solver steps (deepinv's time grid has ``n_steps + 1`` points, 1 to 0).
        observers: called once per step.
        weight: DPS guidance weight (deepinv's ``weight``, residual-norm guidance). At weight <= 1
            deepinv's DPS barely follows the data: on the Gaussian test case its chain KL is ~0, and
            on the MRI demo slice its sample's data misfit (0.196) is worse than zero-filling's
            (0.035) (``examples/deepinv_sampler_with_klip.py``); useful guidance needs weights in
            the hundreds, as deepinv's own ``DPSDataFidelity`` notes.
        generator: randomness (deepinv's ``rng``).
        eta: 1 for DDPM ancestral steps (DPS's default), 0 for deterministic DDIM.
        clip: range deepinv's DPS data fidelity clips the denoised estimate to.

    Returns:
        the ``deepinv.sampling.DPS`` instance; call it as ``model(y, physics, x_init=(S, C, H, W))``.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise KLIPMedError(f"n_steps: expected an integer >= 1, found {n_steps!r}")
    denoiser = EpsilonDenoiser(prior)
    timesteps = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float32)
    T = VPSchedule(prior.alphas_cumprod).num_train_timesteps
    solver = ObservedAncestralSolver(
        denoiser, observers, timesteps, eta=eta, rng=generator, train_step=1.0 / T
    )
    model = dinv.sampling.DPS(
        denoiser,
        solver=solver,
        weight=weight,
        dtype=torch.float32,
        minus_one_one=False,
    )
    model.data_fidelity.clip = sorted(clip)
    solver.prior_sde = model.sde
    return model
