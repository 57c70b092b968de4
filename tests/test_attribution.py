"""The denoiser's attribution of each step's KL (klip_med.sampling.attribution): an attribution, not a
new divergence. On the closed-form Gaussian case it keeps every step's KL exactly (so the chain
KL still lands on KL(posterior || prior)); only the split over pixels changes."""

from __future__ import annotations

import torch

from klip_med.priors.gaussian_case import SIZE, make_case, on_schedule
from klip_med.sampling import DDSSampler, ScoreGuidedSampler
from klip_med.sampling.attribution import DenoisedAttribution, redistribute
from klip_med.score import FULL, KLIPAccumulator, TrajectoryRecorder, Window

SHAPE = (1, SIZE, SIZE)


def _both(sampler, case, n_samples=8, seed=1, windows=(FULL,)):
    plain, attributed, recorded = KLIPAccumulator(list(windows)), KLIPAccumulator(list(windows)), TrajectoryRecorder()
    attribution = DenoisedAttribution(sampler, [attributed, recorded])
    sampler.sample(case.y, case.physics, n_samples, SHAPE, torch.Generator().manual_seed(seed), [plain, attribution])
    return plain.result(), attributed.result(), recorded, attribution


def test_redistribute_keeps_each_samples_norm_and_takes_the_direction():
    g = torch.Generator().manual_seed(0)
    delta, direction = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    direction[2] = 0.0  # no direction: the delta is kept
    out = redistribute(delta, direction)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), delta.flatten(1).norm(dim=1))
    torch.testing.assert_close(out[:2] / out[:2].flatten(1).norm(dim=1)[:, None, None, None],
                               direction[:2] / direction[:2].flatten(1).norm(dim=1)[:, None, None, None])
    torch.testing.assert_close(out[2], delta[2])


def test_every_step_keeps_its_kl_and_the_chain_kl_its_closed_form():
    case = make_case()
    prior, posterior = on_schedule(case.prior, 1000), on_schedule(case.posterior, 1000)
    sampler = ScoreGuidedSampler(prior, posterior.eps, 100)
    windows = (FULL, Window(0.0, 0.3, name="late"), Window(0.3, float("inf"), name="early"))
    plain, attributed, recorded, attribution = _both(sampler, case, windows=windows)
    assert len(recorded.events) == 100 and [e.index for e in recorded.events] == list(range(100))
    assert attribution.network_calls == 99  # one forward per step but the last
    # the same KL per window and per sample, to float32 rounding ...
    torch.testing.assert_close(attributed.pixel_nats.sum(dim=(-1, -2)), plain.pixel_nats.sum(dim=(-1, -2)),
                               rtol=1e-4, atol=1e-6)
    assert attributed.steps_per_window == plain.steps_per_window
    # ... split differently over the pixels
    diff = (attributed.sample_mean()[0] - plain.sample_mean()[0]).abs().sum() / plain.sample_mean()[0].sum()
    assert float(diff) > 0.05
    # the chain KL (the pixel split's) lands on the closed form up to the discrete chain's excess, which
    # shrinks with the steps (x2.4 at 100 steps, +26% at 250, +4% at 1000: tests/test_estimator_analytic.py)
    closed = float(case.posterior.kl_to(case.prior))
    chain = float(attributed.pixel_nats[0].sum(dim=(-1, -2)).mean())
    assert 1.0 <= chain / closed <= 3.0


def test_zero_data_weight_gives_zero_kl():
    case = make_case()
    prior = on_schedule(case.prior, 1000)
    sampler = ScoreGuidedSampler(prior, prior.eps, 20)  # the "posterior" is the prior: d_k = 0
    _, attributed, _, _ = _both(sampler, case, n_samples=2)
    assert float(attributed.pixel_nats.abs().max()) == 0.0


def test_the_fast_sampler_path_emits_one_event_per_step_and_keeps_the_kl():
    """DDS (the sampler of `klip-med run`) on the Gaussian case: one event per step, one extra forward
    per step, the same KL per window and sample."""
    case = make_case()
    prior = on_schedule(case.prior, 1000)
    sampler = DDSSampler(prior, 20)
    plain, attributed, recorded, attribution = _both(sampler, case, n_samples=2)
    assert len(recorded.events) == 20 and attribution.network_calls == 19
    torch.testing.assert_close(attributed.pixel_nats.sum(dim=(-1, -2)), plain.pixel_nats.sum(dim=(-1, -2)),
                               rtol=1e-4, atol=1e-6)


def test_line_reattribution_keeps_every_lines_kl_and_the_chain_kl_of_the_gaussian_case():
    from klip_med.score.reattribution import reattribute_lines

    case = make_case()
    prior, posterior = on_schedule(case.prior, 1000), on_schedule(case.posterior, 1000)
    plain = KLIPAccumulator([FULL])
    ScoreGuidedSampler(prior, posterior.eps, 100).sample(case.y, case.physics, 8, SHAPE,
                                                         torch.Generator().manual_seed(1), [plain])
    kl = plain.result().pixel_nats  # (..., H, W)
    body = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    body[:, : SIZE // 2] = True  # half of every row outside: each row gets a floor
    out = reattribute_lines(kl, body)
    torch.testing.assert_close(out.sum(dim=-1), kl.sum(dim=-1), rtol=1e-5, atol=1e-7)  # every line, exactly
    torch.testing.assert_close(out.sum(dim=(-1, -2)), kl.sum(dim=(-1, -2)), rtol=1e-5, atol=1e-7)
    assert float((out != kl).float().mean()) > 0.1  # ... split differently


def test_line_reattribution_gives_a_lesions_floor_back_to_it():
    from klip_med.score.reattribution import reattribute_lines

    kl = torch.full((16, 32), 0.01)
    body = torch.zeros(16, 32, dtype=torch.bool)
    body[2:14, 8:24] = True
    kl[6:8, 12:14] += 1.0  # the lesion
    kl[6:8] += 0.2  # its aliasing floor along its rows, inside the head and out
    out = reattribute_lines(kl, body)
    torch.testing.assert_close(out.sum(dim=-1), kl.sum(dim=-1))
    assert float(out[6, 18]) < 1e-6 and float(out[6, 12]) > float(kl[6, 12])  # healthy pixel of the row: no floor
    torch.testing.assert_close(out[0], kl[0])  # a flat line keeps its own (uniform) split
    few = torch.zeros(16, 32, dtype=torch.bool)
    few[:, 1:] = True  # one outside pixel per row: lines left as they are
    torch.testing.assert_close(reattribute_lines(kl, few), kl)
    torch.testing.assert_close(reattribute_lines(kl.T, body.T, axis=-2), out.T)
