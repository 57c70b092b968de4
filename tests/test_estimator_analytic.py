"""The estimator against closed-form truth (DESIGN.md section 2).

Gaussian prior N(mu, Sigma) on 16x16 images, y = A x + n. With the exact MMSE noise predictor
and the exact posterior score, the chain KL summed over all steps converges to the closed-form
KL(p(x|y) || p(x)) as the number of steps grows; with block-diagonal Sigma and block-local A every
4x4 block's KLIP converges to that block's closed-form KL.

Tolerances. Two errors separate the estimate from the closed form:
- Monte-Carlo error of the sample mean: we compute its standard error (SE) from the per-sample
  values and allow 4 SE (a false failure rate below 1e-4 per check);
- discretisation bias: the KL between two *discrete* chains exceeds the KL between their end
  points (data processing inequality) and the excess vanishes as steps get finer. Measured with
  S = 128 samples (see the closing note of issue 2): on the linear DDPM schedule with T = 1000,
  +26.1% at 250 steps and +3.9% at 1000 steps; on a 4x finer schedule (T = 4000) +0.4% at 4000
  steps. We allow a bias of 6% at T = N = 1000 and 1% at T = N = 4000 (slow test).
"""

from __future__ import annotations

import pytest
import torch

from klip_med.priors.gaussian_case import BLOCK, SIZE, make_case, on_schedule
from klip_med.sampling import DPSSampler, ScoreGuidedSampler
from klip_med.score import KLIPAccumulator, pool_blocks

SHAPE = (1, SIZE, SIZE)


def _run_exact(case, n_steps: int, n_samples: int, seed: int = 1, schedule_T: int = 1000):
    prior = on_schedule(case.prior, schedule_T)
    posterior = on_schedule(case.posterior, schedule_T)
    acc = KLIPAccumulator()
    sampler = ScoreGuidedSampler(prior, posterior.eps, n_steps)
    result = sampler.sample(
        case.y, case.physics, n_samples, SHAPE, torch.Generator().manual_seed(seed), [acc]
    )
    return acc.result(), result


def _mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.to(torch.float64)
    return float(values.mean()), float(values.std() / values.numel() ** 0.5)


def test_closed_form_kl_is_consistent_over_blocks():
    case = make_case()
    total = case.posterior.kl_to(case.prior)
    assert total > 50.0  # a case where the data really move the posterior
    torch.testing.assert_close(case.block_kl().sum().item(), total, rtol=1e-9, atol=0)


def test_chain_kl_matches_closed_form_with_exact_score():
    case = make_case()
    exact = case.posterior.kl_to(case.prior)
    maps, _ = _run_exact(case, n_steps=1000, n_samples=128)
    per_sample = maps.pixel_nats[0].sum(dim=(1, 2))  # nats per posterior sample
    mean, se = _mean_and_se(per_sample)
    assert abs(mean - exact) <= 0.06 * exact + 4 * se, (mean, se, exact)
    assert maps.fallback_steps_per_window == (1,)  # only the last, deterministic step


def test_chain_kl_converges_as_steps_grow():
    case = make_case()
    exact = case.posterior.kl_to(case.prior)
    errors = []
    for n_steps in (100, 250, 1000):
        maps, _ = _run_exact(case, n_steps=n_steps, n_samples=64)
        errors.append(abs(float(maps.pixel_nats[0].sum(dim=(1, 2)).mean()) - exact) / exact)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.08, errors


def test_every_block_matches_its_closed_form_kl():
    case = make_case()
    truth = case.block_kl()  # (4, 4) nats
    maps, _ = _run_exact(case, n_steps=1000, n_samples=128)
    blocks = pool_blocks(maps.pixel_nats[0], BLOCK).sums.to(torch.float64)  # (S, 4, 4)
    mean = blocks.mean(dim=0)
    se = blocks.std(dim=0) / blocks.shape[0] ** 0.5
    bound = 0.06 * truth + 4 * se
    assert bool(((mean - truth).abs() <= bound).all()), ((mean - truth) / truth)
    # the ranking of blocks (what localisation relies on) is preserved
    order = torch.argsort(truth.flatten())
    assert torch.corrcoef(torch.stack([mean.flatten()[order], truth.flatten()[order]]))[0, 1] > 0.98


@pytest.mark.slow
def test_chain_kl_on_a_fine_schedule_is_within_one_percent():
    case = make_case()
    exact = case.posterior.kl_to(case.prior)
    maps, _ = _run_exact(case, n_steps=4000, n_samples=128, schedule_T=4000)
    mean, se = _mean_and_se(maps.pixel_nats[0].sum(dim=(1, 2)))
    assert abs(mean - exact) <= 0.01 * exact + 4 * se, (mean, se, exact)


def test_exact_posterior_sampler_reaches_the_posterior_mean():
    case = make_case()
    _, result = _run_exact(case, n_steps=1000, n_samples=128)
    got = result.samples.reshape(128, -1).to(torch.float64).mean(dim=0)
    # per-pixel SE of the mean is sqrt(diag(cov_post) / S); allow 5 SE over the image norm
    se = (case.posterior.cov.diagonal() / 128).sqrt()
    assert float((got - case.posterior.mean).norm()) < 5 * float(se.norm())


def test_dps_guidance_is_reported_not_hidden():
    """DPS is not an exact posterior sampler: its chain KL is far from the closed form.

    Its guidance ``zeta * grad ||y - A x0_hat||`` does not shrink with the injected noise, so
    late steps (tiny s_k) dominate. We pin the order of magnitude measured (ratio ~126 at
    zeta = 0.3, 1000 steps) so that a change in it is noticed, not to bless it.
    """
    case = make_case()
    exact = case.posterior.kl_to(case.prior)
    acc = KLIPAccumulator()
    DPSSampler(case.prior, 1000, zeta=0.3).sample(
        case.y, case.physics, 32, SHAPE, torch.Generator().manual_seed(1), [acc]
    )
    ratio = float(acc.result().pixel_nats[0].sum(dim=(1, 2)).mean()) / exact
    assert 30 < ratio < 500, ratio
