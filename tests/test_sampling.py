"""Posterior samplers: one event per step, deltas that are the real posterior-minus-prior
difference, determinism, deepinv's own sampler through the adapter, and bad input."""

from __future__ import annotations

import deepinv as dinv
import pytest
import torch

from klip_med.errors import KLIPMedError
from klip_med.physics import cartesian_mri
from klip_med.priors.gaussian_case import SIZE, make_case
from klip_med.sampling import DDSSampler, DPSSampler, ScoreGuidedSampler
from klip_med.sampling.deepinv_adapter import EpsilonDenoiser, deepinv_dps
from klip_med.score import KLIPAccumulator, TrajectoryRecorder

SHAPE = (1, SIZE, SIZE)


@pytest.fixture(scope="module")
def case():
    return make_case()


def _samplers(case):
    return {
        "dps": DPSSampler(case.prior, 12, zeta=0.3),
        "dds": DDSSampler(case.prior, 12, eta=0.85, gamma=1.0, cg_iters=3),
        "dds-deterministic": DDSSampler(case.prior, 12, eta=0.0),
        "exact": ScoreGuidedSampler(case.prior, case.posterior.eps, 12),
    }


@pytest.mark.parametrize("name", ["dps", "dds", "dds-deterministic", "exact"])
def test_one_event_per_step_and_delta_is_posterior_minus_prior(case, name):
    sampler = _samplers(case)[name]
    recorder = TrajectoryRecorder()
    seed = 7
    result = sampler.sample(case.y, case.physics, 3, SHAPE, torch.Generator().manual_seed(seed), [recorder])
    assert len(recorder) == sampler.n_steps == 12
    assert [e.index for e in recorder.events] == list(range(12))
    assert [e.sigma for e in recorder.events] == list(sampler.step_sigmas)
    # Replay the generator: initial noise, then one draw per step (the documented order).
    replay = torch.Generator().manual_seed(seed)
    x = torch.randn((3, *SHAPE), generator=replay)
    torch.testing.assert_close(x, result.x_init)
    for plan, event in zip(sampler.plans, recorder.events, strict=True):
        z = torch.randn((3, *SHAPE), generator=replay)
        x_prior, x0_hat, _ = sampler.prior_transition(x, plan, z)
        torch.testing.assert_close(event.delta, event.x - x_prior, rtol=0, atol=1e-5)
        torch.testing.assert_close(event.x0_hat, x0_hat, rtol=0, atol=1e-5)
        x = event.x
    torch.testing.assert_close(x, result.samples)
    assert float(torch.stack([e.delta.abs().max() for e in recorder.events]).max()) > 0


def test_same_seed_same_maps_bit_for_bit(case):
    def run(seed):
        acc = KLIPAccumulator()
        res = DPSSampler(case.prior, 10, zeta=0.3).sample(
            case.y, case.physics, 2, SHAPE, torch.Generator().manual_seed(seed), [acc]
        )
        return res.samples, acc.result().pixel_nats

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_zero_guidance_dps_has_zero_delta_and_is_the_prior_sampler(case):
    recorder = TrajectoryRecorder()
    DPSSampler(case.prior, 8, zeta=0.0).sample(
        case.y, case.physics, 2, SHAPE, torch.Generator().manual_seed(0), [recorder]
    )
    assert all(float(e.delta.abs().max()) == 0.0 for e in recorder.events)


def test_dds_moves_toward_the_data_on_mri(rng):
    """DDS's data consistency on a real MRI operator: the posterior mean fits y better than the prior."""
    case = make_case()
    physics = cartesian_mri(SIZE, acceleration=2, center_fraction=0.25, generator=torch.Generator().manual_seed(0))
    y = physics.A(case.x_true)
    post = DDSSampler(case.prior, 20, gamma=10.0).sample(y, physics, 4, SHAPE, rng)
    prior_only = DDSSampler(case.prior, 20, gamma=1e-9, cg_iters=1).sample(
        y, physics, 4, SHAPE, torch.Generator().manual_seed(1234)
    )
    fit = lambda s: float((physics.A(s.mean) - y).norm())  # noqa: E731
    assert fit(post) < 0.5 * fit(prior_only)


def test_deepinv_dps_through_the_adapter_matches_plain_deepinv(case):
    """Our observers do not change deepinv's result, and every step is reported once."""
    recorder = TrajectoryRecorder()
    observed = deepinv_dps(case.prior, 15, [recorder], weight=0.5, generator=torch.Generator().manual_seed(9), clip=(-10, 10))
    x_init = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(1))
    out_observed = observed(case.y.expand(2, -1), case.physics, x_init=x_init.clone())
    denoiser = EpsilonDenoiser(case.prior)
    plain = dinv.sampling.DPS(
        denoiser, solver="ddpm", num_steps=16, weight=0.5, dtype=torch.float32,
        minus_one_one=False, rng=torch.Generator().manual_seed(9),
    )
    plain.data_fidelity.clip = [-10, 10]
    out_plain = plain(case.y.expand(2, -1), case.physics, x_init=x_init.clone())
    torch.testing.assert_close(out_observed, out_plain, rtol=0, atol=1e-5)
    assert len(recorder) == 15
    assert [e.index for e in recorder.events] == list(range(15))
    assert recorder.events[0].sigma > recorder.events[-1].sigma
    assert float(sum(e.delta.abs().sum() for e in recorder.events)) > 0


def test_deepinv_adapter_delta_against_deepinv_unconditional_step(case):
    """With deterministic DDIM steps, x_post - delta must equal deepinv's own unconditional step."""
    recorder = TrajectoryRecorder()
    model = deepinv_dps(case.prior, 10, [recorder], weight=0.5, eta=0.0, clip=(-10, 10))
    x_init = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(3))
    model(case.y.expand(2, -1), case.physics, x_init=x_init.clone())
    # deepinv's unconditional VP SDE on our denoiser, in the prior's own range (as
    # PosteriorDiffusion(minus_one_one=False) sets it; the SDE's constructor would wrap it to [0, 1])
    prior_sde = dinv.sampling.VariancePreservingDiffusion(dtype=torch.float32)
    prior_sde.denoiser = EpsilonDenoiser(case.prior)
    solver = dinv.sampling.DDIMSolver(timesteps=torch.linspace(1.0, 0.0, 11))
    x = x_init
    for k, event in enumerate(recorder.events):
        t0, t1 = solver.timesteps[k], solver.timesteps[k + 1]
        x_prior, _ = solver.step(prior_sde, t0, t1, x)
        torch.testing.assert_close(event.delta, event.x - x_prior, rtol=0, atol=1e-4)
        x = event.x
    assert all(float(e.noise_std.abs().max()) == 0.0 for e in recorder.events)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda c: c.y * float("nan"), r"y: expected finite measurements, found 128 NaN / Inf values"),
        (lambda c: c.y[:, :10], r"y: expected measurement of shape \(1 or S, 128\) for images of shape \(1, 16, 16\), found \(1, 10\)"),
    ],
)
def test_bad_measurements_are_refused(case, bad, match):
    with pytest.raises(KLIPMedError, match=match):
        DPSSampler(case.prior, 5).sample(bad(case), case.physics, 2, SHAPE, torch.Generator())


def test_physics_that_does_not_fit_the_image_is_refused(case):
    physics = cartesian_mri(32, acceleration=2)
    with pytest.raises(KLIPMedError, match=r"expected image of shape \(B, 1, 32, 32\), found \(1, 1, 16, 16\)"):
        DPSSampler(case.prior, 5).sample(case.y, physics, 2, SHAPE, torch.Generator())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda c: DPSSampler(c.prior, 0), r"n_steps: expected an integer in \[1, 1000\] .* found 0"),
        (lambda c: DPSSampler(c.prior, 2000), r"n_steps: expected an integer in \[1, 1000\] .* found 2000"),
        (lambda c: DPSSampler(c.prior, 5, zeta=-1.0), r"zeta: expected a guidance step size >= 0, found -1.0"),
        (lambda c: DDSSampler(c.prior, 5, eta=1.5), r"eta: expected a DDIM stochasticity in \[0, 1\], found 1.5"),
        (lambda c: DPSSampler(object(), 5), r"prior: expected an EpsilonPrior .* found object"),
        (lambda c: DPSSampler(c.prior, 5).sample(c.y, c.physics, 0, SHAPE, torch.Generator()),
         r"n_samples: expected an integer >= 1, found 0"),
        (lambda c: DPSSampler(c.prior, 5).sample(c.y, c.physics, 2, SHAPE, 42),
         r"generator: expected a torch.Generator, found int"),
    ],
)
def test_bad_sampler_arguments_are_refused(case, make, match):
    with pytest.raises(KLIPMedError, match=match):
        make(case)
