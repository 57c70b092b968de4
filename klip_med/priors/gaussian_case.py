"""The closed-form verification case: block-diagonal Gaussian prior, block-local measurement.

Used by the estimator tests and by ``klip-med verify``. 16x16 images tiled by 4x4 pixel blocks; the prior covariance is
block diagonal over those blocks and the measurement matrix only mixes pixels of one block, so
the posterior factorises over blocks and each block's KL(posterior || prior) is closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import deepinv as dinv
import torch

from klip_med.priors import GaussianPrior
from klip_med.sampling import linear_beta_alphas_cumprod

SIZE = 16
BLOCK = 4


def pixel_blocks(size: int = SIZE, block: int = BLOCK) -> torch.Tensor:
    """Block label of each flattened pixel, (size*size,)."""
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((i // block) * (size // block) + (j // block)).reshape(-1)


@dataclass
class GaussianCase:
    prior: GaussianPrior
    posterior: GaussianPrior
    A: torch.Tensor  # (m, n)
    noise_sigma: float
    y: torch.Tensor  # (1, m)
    x_true: torch.Tensor  # (1, 1, H, W)
    physics: dinv.physics.LinearPhysics
    labels: torch.Tensor  # (n,) block label per pixel

    def block_kl(self) -> torch.Tensor:
        """Closed-form KL(posterior || prior) of each 4x4 block, (4, 4) nats."""
        out = torch.zeros(self.labels.max() + 1, dtype=torch.float64)
        for b in range(out.numel()):
            idx = (self.labels == b).nonzero().reshape(-1)
            out[b] = _marginal(self.posterior, idx).kl_to(_marginal(self.prior, idx))
        side = SIZE // BLOCK
        return out.reshape(side, side)


def _marginal(gaussian: GaussianPrior, idx: torch.Tensor) -> GaussianPrior:
    """The marginal of a Gaussian on the pixels ``idx`` (one 4x4 block)."""
    return GaussianPrior(
        gaussian.mean[idx], gaussian.cov[idx][:, idx], (1, BLOCK, BLOCK), gaussian.alphas_cumprod
    )


def matrix_physics(A: torch.Tensor, image_shape=(1, SIZE, SIZE)) -> dinv.physics.LinearPhysics:
    """A deepinv LinearPhysics applying the matrix A to flattened images."""
    A32 = A.to(torch.float32)

    def forward(x):
        return x.reshape(x.shape[0], -1) @ A32.T

    def adjoint(y):
        return (y @ A32).reshape(y.shape[0], *image_shape)

    return dinv.physics.LinearPhysics(A=forward, A_adjoint=adjoint)


def make_case(seed: int = 0, rows_per_block: int = 8, noise_sigma: float = 0.1) -> GaussianCase:
    """Build the case deterministically from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = pixel_blocks()
    n = SIZE * SIZE
    i, j = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    coords = torch.stack([i.reshape(-1), j.reshape(-1)], 1).to(torch.float64)
    dist2 = torch.cdist(coords, coords).square()
    same_block = labels[:, None] == labels[None, :]
    scale = 0.2 + 0.3 * torch.rand(labels.max() + 1, generator=g, dtype=torch.float64)
    cov = torch.exp(-dist2 / (2 * 1.5**2)) * same_block
    cov = cov * (scale[labels][:, None] * scale[labels][None, :]) + 0.01 * torch.eye(n, dtype=torch.float64)
    mean = 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    alphas = linear_beta_alphas_cumprod(1000)
    prior = GaussianPrior(mean, cov, (1, SIZE, SIZE), alphas)
    n_blocks = int(labels.max()) + 1
    A = torch.zeros(n_blocks * rows_per_block, n, dtype=torch.float64)
    for b in range(n_blocks):
        idx = (labels == b).nonzero().reshape(-1)
        block_rows = torch.randn(rows_per_block, idx.numel(), generator=g, dtype=torch.float64)
        A[b * rows_per_block : (b + 1) * rows_per_block, idx] = block_rows / idx.numel() ** 0.5
    x_true = prior.sample(1, g)
    y = x_true.reshape(1, -1).to(torch.float64) @ A.T
    y = y + noise_sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
    posterior = prior.posterior(A, noise_sigma, y[0])
    return GaussianCase(
        prior=prior,
        posterior=posterior,
        A=A,
        noise_sigma=noise_sigma,
        y=y.to(torch.float32),
        x_true=x_true,
        physics=matrix_physics(A),
        labels=labels,
    )


def on_schedule(prior: GaussianPrior, train_steps: int) -> GaussianPrior:
    """The same Gaussian on a linear-beta VP schedule of ``train_steps`` timesteps.

    The betas are scaled by ``1000 / train_steps`` so the continuous-time SDE is the same as the
    standard T = 1000 schedule; only the discretisation gets finer.
    """
    a = linear_beta_alphas_cumprod(train_steps, 0.1 / train_steps, 20.0 / train_steps)
    return GaussianPrior(prior.mean, prior.cov, prior.image_shape, a)


def verify_report(
    step_counts: tuple[int, ...] = (250, 1000),
    n_samples: int = 128,
    seed: int = 1,
    train_steps: int = 1000,
) -> dict:
    """Run the exact-score posterior sampler on the closed-form case and compare with the truth.

    Args:
        step_counts: sampling steps to try (each <= ``train_steps``).
        n_samples: posterior samples per run.
        seed: generator seed.
        train_steps: timesteps of the VP schedule (finer schedules shrink the discretisation
            bias of the chain KL).

    Returns a JSON-ready dict: the closed-form KL (nats), and per step count the chain KL
    estimate (mean over samples, its standard error), the ratio to the truth, and the largest
    relative block error.
    """
    from klip_med.sampling import ScoreGuidedSampler
    from klip_med.score import KLIPAccumulator, pool_blocks

    case = make_case()
    prior = on_schedule(case.prior, train_steps)
    posterior = on_schedule(case.posterior, train_steps)
    exact = case.posterior.kl_to(case.prior)
    truth_blocks = case.block_kl()
    rows = []
    for n_steps in step_counts:
        acc = KLIPAccumulator()
        ScoreGuidedSampler(prior, posterior.eps, n_steps).sample(
            case.y, case.physics, n_samples, (1, SIZE, SIZE), torch.Generator().manual_seed(seed), [acc]
        )
        pixel = acc.result().pixel_nats[0].to(torch.float64)
        per_sample = pixel.sum(dim=(1, 2))
        blocks = pool_blocks(pixel.mean(dim=0), BLOCK).sums
        rows.append(
            {
                "steps": n_steps,
                "chain_kl_nats": float(per_sample.mean()),
                "standard_error_nats": float(per_sample.std() / n_samples**0.5),
                "ratio_to_closed_form": float(per_sample.mean()) / exact,
                "max_block_relative_error": float(((blocks - truth_blocks).abs() / truth_blocks).max()),
            }
        )
    return {
        "closed_form_kl_nats": exact,
        "samples": n_samples,
        "train_steps": train_steps,
        "runs": rows,
    }
