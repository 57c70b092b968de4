"""A fast posterior sampler with no backpropagation through the network (DDS-style).

Decomposed Diffusion Sampling (Chung, Lee, Ye, ICLR 2024): at each step the prior's denoised
estimate ``x0_hat`` is moved toward the data by a few conjugate-gradient iterations of the
proximal problem ``min_x ||A x - y||^2 + (1/gamma) ||x - x0_hat||^2`` (deepinv's
``least_squares``), then re-noised by a DDIM step with stochasticity ``eta``::

    x_prior = sqrt(a_next) x0_hat + sqrt(1 - a_next - s^2) eps + s z
    x_post  = sqrt(a_next) x0_dc  + sqrt(1 - a_next - s^2) eps + s z
    d_k     = sqrt(a_next) (x0_dc - x0_hat),   s = eta * sqrt(beta_tilde)

One network forward per step. With ``eta = 0`` every step is deterministic and the KLIP
accumulator uses the SDE normalisation (recorded in its metadata).
"""

from __future__ import annotations

import math

import torch
from deepinv.optim.linear import least_squares
from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.sampling.base import PosteriorSampler, StepPlan
from klip_med.sampling.cg import proximal_cg
from klip_med.sampling.prior import EpsilonPrior


class DDSSampler(PosteriorSampler):
    """DDIM(eta) sampling with conjugate-gradient data consistency on the denoised estimate.

    Args:
        prior: epsilon-prediction VP prior.
        n_steps: sampling steps (<= training timesteps).
        eta: DDIM stochasticity in [0, 1] (0.85 as in DDS).
        gamma: weight of the data term relative to staying near ``x0_hat`` (> 0), or ``None`` for
            DDS's unregularised, early-stopped CG.
        cg_iters: conjugate-gradient iterations per step.
        clip_x0: optional data range for the denoised estimate.
    """

    def __init__(
        self,
        prior: EpsilonPrior,
        n_steps: int,
        eta: float = 0.85,
        gamma: float | None = 1.0,
        cg_iters: int = 5,
        clip_x0: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(prior, n_steps, clip_x0)
        if not 0.0 <= eta <= 1.0:
            raise KLIPMedError(f"eta: expected a DDIM stochasticity in [0, 1], found {eta}")
        if gamma is not None and not gamma > 0:
            raise KLIPMedError(f"gamma: expected > 0 or None, found {gamma}")
        if not isinstance(cg_iters, int) or cg_iters < 1:
            raise KLIPMedError(f"cg_iters: expected an integer >= 1, found {cg_iters!r}")
        self.eta = float(eta)
        self.gamma = gamma
        self.cg_iters = cg_iters

    def noise_std(self, plan: StepPlan) -> float:
        return self.eta * math.sqrt(plan.posterior_var)

    def _ddim(self, x0: Tensor, eps: Tensor, plan: StepPlan, z: Tensor) -> Tensor:
        s = self.noise_std(plan)
        a_next = plan.alpha_bar_next
        direction = math.sqrt(max(1.0 - a_next - s * s, 0.0))
        return math.sqrt(a_next) * x0 + direction * eps + s * z

    def prior_transition(self, x: Tensor, plan: StepPlan, z: Tensor):
        with torch.no_grad():
            eps = self._eps(x, plan)
        x0 = self.denoise(x, eps, plan)
        return self._ddim(x0, eps, plan, z), x0, eps

    def _step(self, x: Tensor, plan: StepPlan, z: Tensor, y: Tensor, physics):
        x_prior, x0, eps = self.prior_transition(x, plan, z)
        with torch.no_grad():
            if self.gamma is None:  # DDS's unregularised CG: deepinv's solver (syncs once per iteration)
                x0_dc = least_squares(
                    physics.A, physics.A_adjoint, y, z=x0, init=x0, gamma=None, solver="CG",
                    max_iter=self.cg_iters, tol=0.0,
                )
            else:  # the same iterations without host synchronisation
                x0_dc = proximal_cg(physics.A, physics.A_adjoint, y, x0, self.gamma, self.cg_iters)
        if self.clip_x0 is not None:
            x0_dc = x0_dc.clamp(*self.clip_x0)
        return x_prior, self._ddim(x0_dc, eps, plan, z), x0
