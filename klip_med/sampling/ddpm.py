"""DDPM-based posterior samplers: DPS (Chung et al. 2023) and exact-score guidance.

Both take the DDPM ancestral step of the prior and add a data-consistency change ``d_k``::

    x_prior = mean_prior(x_k) + sqrt(beta_tilde_k) z
    x_post  = x_prior + d_k
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.sampling.base import PosteriorSampler, StepPlan
from klip_med.sampling.prior import EpsilonPrior


class DPSSampler(PosteriorSampler):
    """Diffusion Posterior Sampling on respaced DDPM ancestral steps.

    ``d_k = -zeta * grad_{x_k} || y - A x0_hat(x_k) ||`` (the residual norm, not squared, as in
    the original DPS code; each posterior sample is guided by its own residual). One network
    forward and one backward per step.

    Args:
        prior: epsilon-prediction VP prior.
        n_steps: sampling steps (<= training timesteps).
        zeta: guidance step size (dimensionless for the norm guidance; 1.0 in the DPS paper's
            default configurations).
        clip_x0: optional data range for the denoised estimate.
    """

    def __init__(
        self,
        prior: EpsilonPrior,
        n_steps: int,
        zeta: float = 1.0,
        clip_x0: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(prior, n_steps, clip_x0)
        if not zeta >= 0:
            raise KLIPMedError(f"zeta: expected a guidance step size >= 0, found {zeta}")
        self.zeta = float(zeta)

    def _step(self, x: Tensor, plan: StepPlan, z: Tensor, y: Tensor, physics):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            eps = self._eps(x_in, plan)
            x0 = self.denoise(x_in, eps, plan)
            residual = (physics.A(x0) - y).flatten(1)
            norms = torch.linalg.vector_norm(residual, dim=1)
            (grad,) = torch.autograd.grad(norms.sum(), x_in)
        x0 = x0.detach()
        x_prior = self.ddpm_mean(x, x0, plan) + (plan.posterior_var**0.5) * z
        return x_prior, x_prior - self.zeta * grad, x0


class ScoreGuidedSampler(PosteriorSampler):
    """DDPM ancestral sampling with a given posterior noise predictor (e.g. the exact one).

    The posterior step uses ``eps_post(x_t, t)`` where the prior step uses ``prior.eps``; with
    the exact posterior score this is the ideal posterior sampler the KLIP estimator is proven
    against. Two network evaluations per step.

    Args:
        prior: epsilon-prediction VP prior.
        eps_posterior: ``(x_t (B,C,H,W), t (B,)) -> eps`` of the posterior diffusion.
        n_steps, clip_x0: as for :class:`DPSSampler`.
    """

    nfe_per_step = 2

    def __init__(
        self,
        prior: EpsilonPrior,
        eps_posterior: Callable[[Tensor, Tensor], Tensor],
        n_steps: int,
        clip_x0: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(prior, n_steps, clip_x0)
        self.eps_posterior = eps_posterior

    def _step(self, x: Tensor, plan: StepPlan, z: Tensor, y: Tensor, physics):
        x_prior, x0_prior, _ = self.prior_transition(x, plan, z)
        t = torch.full((x.shape[0],), float(plan.t), dtype=torch.float32, device=x.device)
        with torch.no_grad():
            x0_post = self.denoise(x, self.eps_posterior(x, t), plan)
        noise = (plan.posterior_var**0.5) * z
        return x_prior, self.ddpm_mean(x, x0_post, plan) + noise, x0_prior
