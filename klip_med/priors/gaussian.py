"""An analytic Gaussian diffusion prior: exact noise predictor, exact posterior, closed-form KL.

For a prior ``x ~ N(mu, Sigma)`` on images flattened to n pixels, the VP-noised marginal is
``x_t ~ N(sqrt(a) mu, a Sigma + (1 - a) I)`` (``a = alpha_bar_t``), so the MMSE noise predictor
is exact::

    eps(x_t) = sqrt(1 - a) (a Sigma + (1 - a) I)^{-1} (x_t - sqrt(a) mu)

For a linear measurement ``y = A x + n``, ``n ~ N(0, s_y^2 I)``, the posterior is Gaussian too
(:meth:`GaussianPrior.posterior`), and its own noise predictor is the exact posterior score.
This is the ground truth the KLIP estimator is tested against (DESIGN.md section 2).
All linear algebra runs in float64 through an eigendecomposition of ``Sigma``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.sampling.schedule import VPSchedule


class GaussianPrior:
    """A Gaussian prior N(mean, cov) on (C, H, W) images, usable as an ``EpsilonPrior``.

    Args:
        mean: (n,) with n = C*H*W.
        cov: (n, n) symmetric positive definite.
        image_shape: (C, H, W).
        alphas_cumprod: the VP schedule the noise predictor answers for, (T,).
    """

    def __init__(
        self, mean: Tensor, cov: Tensor, image_shape: tuple[int, int, int], alphas_cumprod: Tensor
    ) -> None:
        n = math.prod(image_shape)
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if mean.numel() != n or tuple(cov.shape) != (n, n):
            raise KLIPMedError(
                f"mean / cov: expected shapes ({n},) and ({n}, {n}) for images {image_shape}, "
                f"found {tuple(mean.shape)} and {tuple(cov.shape)}"
            )
        cov = 0.5 * (cov + cov.T)
        evals, evecs = torch.linalg.eigh(cov)
        if float(evals.min()) <= 0:
            raise KLIPMedError(
                f"cov: expected a positive definite matrix, found smallest eigenvalue {float(evals.min()):.3g}"
            )
        self.mean = mean
        self.cov = cov
        self.evals = evals
        self.evecs = evecs
        self.image_shape = tuple(image_shape)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.schedule = VPSchedule(self.alphas_cumprod)

    @property
    def n(self) -> int:
        return self.mean.numel()

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Exact noise predictor at fractional timesteps ``t`` (B,), x_t (B, C, H, W)."""
        a = self.schedule.alpha_bar_at(t.cpu()).to(x_t.device)  # (B,)
        x = x_t.to(torch.float64).reshape(x_t.shape[0], -1)
        V = self.evecs.to(x.device)
        centred = x - a.sqrt()[:, None] * self.mean.to(x.device)[None]
        coords = centred @ V  # (B, n)
        inv = 1.0 / (a[:, None] * self.evals.to(x.device)[None] + (1.0 - a)[:, None])
        out = (1.0 - a).sqrt()[:, None] * ((coords * inv) @ V.T)
        return out.reshape(x_t.shape).to(x_t.dtype)

    def sample(self, n_samples: int, generator: torch.Generator) -> Tensor:
        """Draw (n_samples, C, H, W) float32 images."""
        z = torch.randn((n_samples, self.n), generator=generator, dtype=torch.float64)
        x = self.mean[None] + (z * self.evals.sqrt()[None]) @ self.evecs.T
        return x.reshape(n_samples, *self.image_shape).to(torch.float32)

    def posterior(self, A: Tensor, noise_sigma: float, y: Tensor) -> GaussianPrior:
        """The exact posterior p(x | y) for ``y = A x + n``, ``n ~ N(0, noise_sigma^2 I)``.

        Args:
            A: (m, n) measurement matrix acting on flattened images.
            noise_sigma: > 0, measurement noise std.
            y: (m,) measurement.
        """
        A = torch.as_tensor(A, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        if A.ndim != 2 or A.shape[1] != self.n or A.shape[0] != y.numel():
            raise KLIPMedError(
                f"A / y: expected A of shape (m, {self.n}) and y of shape (m,), found "
                f"{tuple(A.shape)} and {tuple(y.shape)}"
            )
        if not noise_sigma > 0:
            raise KLIPMedError(f"noise_sigma: expected > 0, found {noise_sigma}")
        prec = (self.evecs / self.evals[None]) @ self.evecs.T + A.T @ A / noise_sigma**2
        cov_post = torch.linalg.inv(prec)
        cov_post = 0.5 * (cov_post + cov_post.T)
        prior_prec_mean = (self.evecs / self.evals[None]) @ (self.evecs.T @ self.mean)
        mean_post = cov_post @ (prior_prec_mean + A.T @ y / noise_sigma**2)
        return GaussianPrior(mean_post, cov_post, self.image_shape, self.alphas_cumprod)

    def kl_to(self, other: GaussianPrior) -> float:
        """Closed-form KL(self || other) in nats."""
        if other.n != self.n:
            raise KLIPMedError(f"other: expected a Gaussian on {self.n} pixels, found {other.n}")
        other_inv = (other.evecs / other.evals[None]) @ other.evecs.T
        diff = other.mean - self.mean
        trace = float(torch.trace(other_inv @ self.cov))
        maha = float(diff @ other_inv @ diff)
        logdet = float(other.evals.log().sum() - self.evals.log().sum())
        return 0.5 * (trace - self.n + maha + logdet)
