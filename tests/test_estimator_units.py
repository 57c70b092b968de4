"""The estimator's pure math, windows, blocks and errors on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from klip_med.data.masks import body_mask
from klip_med.errors import KLIPMedError
from klip_med.sampling import linear_beta_alphas_cumprod
from klip_med.score import (
    FULL,
    KLIPAccumulator,
    StepEvent,
    Window,
    blocks_inside_mask,
    check_windows_cover_steps,
    image_score,
    klip_pixel_map,
    pool_blocks,
    step_pixel_kl,
    window_from_normalized_time,
    window_from_step_indices,
)


def _event(k, sigma, delta, noise_std=0.5, g=0.1, dt=2.0):
    return StepEvent(
        index=k,
        sigma=sigma,
        noise_std=torch.as_tensor(noise_std, dtype=torch.float32),
        delta=delta,
        x=torch.zeros_like(delta),
        g=g,
        dt=dt,
    )


def test_transition_kl_is_d_squared_over_two_s_squared_summed_over_channels():
    delta = torch.zeros(2, 3, 2, 2)
    delta[0, :, 0, 0] = torch.tensor([1.0, 2.0, 2.0])  # squared sum 9
    delta[1, 1, 1, 1] = 3.0  # 9
    kl, fell_back = step_pixel_kl(delta, torch.tensor([0.5, 1.5]))
    expected = torch.zeros(2, 2, 2)
    expected[0, 0, 0] = 9 / (2 * 0.25)
    expected[1, 1, 1] = 9 / (2 * 2.25)
    torch.testing.assert_close(kl, expected)
    assert not bool(fell_back)


def test_deterministic_step_falls_back_to_sde_variance_and_says_so():
    delta = torch.full((1, 1, 2, 2), 0.2)
    kl, fell_back = step_pixel_kl(delta, torch.tensor(0.0), g=0.1, dt=4.0)
    torch.testing.assert_close(kl, torch.full((1, 2, 2), 0.04 / (2 * 0.01 * 4.0)))
    assert bool(fell_back)
    acc = KLIPAccumulator()
    acc(_event(0, 1.0, delta, noise_std=0.0, g=0.1, dt=4.0))
    maps = acc.result()
    assert maps.fallback_steps_per_window == (1,)
    assert "SDE normalisation" in maps.metadata()["notes"][0]


def test_deterministic_step_without_g_is_refused():
    acc = KLIPAccumulator()
    acc(_event(0, 1.0, torch.ones(1, 1, 2, 2), noise_std=0.0, g=None, dt=None))
    with pytest.raises(KLIPMedError, match=r"StepEvent.g / StepEvent.dt: expected .* found None"):
        acc.result()


def test_sde_and_paper_normalisations():
    delta = torch.full((1, 1, 1, 1), 0.3)
    sde, _ = step_pixel_kl(delta, torch.tensor(0.5), normalization="sde", g=0.2, dt=3.0)
    torch.testing.assert_close(sde, torch.full((1, 1, 1), 0.09 / (2 * 0.04 * 3.0)))
    paper, _ = step_pixel_kl(delta, torch.tensor(0.5), normalization="paper", g=0.2, dt=3.0)
    torch.testing.assert_close(paper, torch.full((1, 1, 1), 0.09 / 0.04))


def test_square_of_mean_averages_deltas_before_squaring():
    delta = torch.tensor([1.0, -1.0, 3.0]).reshape(3, 1, 1, 1)
    mean_of_sq = klip_pixel_map([_event(0, 1.0, delta)], combine="mean")
    sq_of_mean = klip_pixel_map([_event(0, 1.0, delta)], combine="square_of_mean")
    assert mean_of_sq.shape == (1, 3, 1, 1) and sq_of_mean.shape == (1, 1, 1, 1)
    torch.testing.assert_close(mean_of_sq.mean(), torch.tensor((1 + 1 + 9) / 3 / 0.5))
    torch.testing.assert_close(sq_of_mean[0, 0, 0, 0], torch.tensor(1.0 / 0.5))


def test_many_windows_fill_in_one_pass():
    delta = torch.ones(1, 1, 2, 2)
    windows = [FULL, Window(0.0, 1.5, name="low"), Window(1.5, 10.0, name="high")]
    acc = KLIPAccumulator(windows)
    for k, sigma in enumerate([5.0, 2.0, 1.0, 0.1]):
        acc(_event(k, sigma, delta * (k + 1)))
    maps = acc.result()
    assert maps.steps_per_window == (4, 2, 2)
    per_step = [(k + 1) ** 2 / 0.5 for k in range(4)]  # d^2 / (2 * 0.25)
    torch.testing.assert_close(maps.pixel_nats[:, 0, 0, 0], torch.tensor(
        [sum(per_step), per_step[2] + per_step[3], per_step[0] + per_step[1]]
    ))
    assert maps.window_index("low") == 1


def test_paper_normalisation_averages_over_the_window_steps():
    acc = KLIPAccumulator([FULL], normalization="paper")
    for k in range(4):
        acc(_event(k, 1.0, torch.full((1, 1, 1, 1), float(k)), g=0.5))
    torch.testing.assert_close(
        acc.result().pixel_nats.reshape(()), torch.tensor((0 + 1 + 4 + 9) / 4 / 0.25)
    )


def test_windows_from_normalised_time_and_step_indices():
    a = linear_beta_alphas_cumprod(1000)
    sigmas = ((1 - a) / a).sqrt()
    w = window_from_normalized_time(0.0, 1.0, a)
    assert w.sigma_min == 0.0 and w.sigma_max == math.inf  # the ends are open on the sigma axis
    assert w.contains(float(sigmas[0])) and w.contains(float(sigmas[-1]))
    mid = window_from_normalized_time(0.25, 0.5, a)
    assert float(sigmas[249]) <= mid.sigma_min <= float(sigmas[250])
    assert float(sigmas[499]) <= mid.sigma_max <= float(sigmas[500])
    step_sigmas = [10.0, 5.0, 1.0, 0.5]
    w2 = window_from_step_indices(1, 2, step_sigmas)
    assert (w2.sigma_min, w2.sigma_max) == (1.0, 10.0)  # half-open: up to the step before the first
    assert [w2.contains(s) for s in step_sigmas] == [False, True, True, False]
    w0 = window_from_step_indices(0, 0, step_sigmas)
    assert w0.sigma_max == math.inf and [w0.contains(s) for s in step_sigmas] == [True, False, False, False]


def test_windows_are_half_open_so_adjacent_windows_partition_the_steps():
    """A step on a shared edge belongs to the upper window only; [a, b) and [b, c) never share a step."""
    lower, upper = Window(1.0, 2.0), Window(2.0, 3.0)
    assert not lower.contains(2.0) and upper.contains(2.0)
    assert lower.contains(1.0) and not upper.contains(3.0)
    assert Window(2.0, math.inf).contains(1e9)  # the top window is closed at the top


@pytest.mark.parametrize("steps", [7, 50, 100, 333, 1000])
def test_tenths_of_normalised_time_partition_every_run(steps):
    """t:0,0.1 ... t:0.9,1 hold each step of a run exactly once; the nine calibrated windows (from
    t:0.1) hold every step but those below t = 0.1, and each at most once."""
    from klip_med.pipeline.settings import CALIBRATED_WINDOWS, parse_window
    from klip_med.sampling.base import plan_steps
    from klip_med.sampling.schedule import VPSchedule

    a = linear_beta_alphas_cumprod(1000)
    sigmas = [p.sigma for p in plan_steps(VPSchedule(a), steps)]
    tenths = [parse_window(f"t:{k / 10:g},{(k + 1) / 10:g}", a) for k in range(10)]
    assert [sum(w.contains(s) for w in tenths) for s in sigmas] == [1] * steps
    calibrated = [parse_window(w, a) for w in CALIBRATED_WINDOWS]
    counts = [sum(w.contains(s) for s in sigmas) for w in calibrated]
    below = sum(tenths[0].contains(s) for s in sigmas)
    assert sum(counts) == steps - below
    assert all(sum(w.contains(s) for w in calibrated) <= 1 for s in sigmas)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Window(2.0, 1.0), r"Window.sigma_max: expected >= sigma_min \(2.0\), found 1.0"),
        (lambda: Window(-1.0, 1.0), r"Window.sigma_min: expected >= 0, found -1.0"),
        (lambda: window_from_normalized_time(0.5, 1.2, linear_beta_alphas_cumprod(10)),
         r"t_end: expected a normalised time in \[0, 1\], found 1.2"),
        (lambda: window_from_step_indices(2, 5, [3.0, 2.0, 1.0]),
         r"step indices: expected 0 <= first <= last < 3 .* found first=2, last=5"),
        (lambda: check_windows_cover_steps([Window(200.0, 300.0)], [100.0, 1.0, 0.01]),
         r"windows\[0\] \(sigma\[200,300\]\): expected a window holding at least one .* found none"),
        (lambda: KLIPAccumulator(normalization="nats"),
         r"normalization: expected one of \['transition', 'sde', 'paper'\], found 'nats'"),
        (lambda: KLIPAccumulator(combine="median"),
         r"combine: expected one of \['mean', 'square_of_mean'\], found 'median'"),
        (lambda: pool_blocks(torch.zeros(8, 8), 9),
         r"block_size: expected each side in \[1, image size \(8, 8\)\], found \(9, 9\)"),
    ],
)
def test_bad_input_raises_our_error_naming_the_argument(make, match):
    with pytest.raises(KLIPMedError, match=match):
        make()


def test_window_with_no_steps_is_reported_at_result():
    acc = KLIPAccumulator([FULL, Window(100.0, 200.0, name="noisy")])
    acc(_event(0, 1.0, torch.ones(1, 1, 2, 2)))
    with pytest.raises(KLIPMedError, match=r"windows \['noisy'\]: expected each window"):
        acc.result()


def test_block_pooling_handles_partial_edge_blocks():
    pixel = torch.arange(1.0, 36.0 + 1).reshape(6, 6)
    blocks = pool_blocks(pixel, 4)
    assert blocks.grid == (2, 2)
    assert blocks.pixel_counts.tolist() == [[16, 8], [8, 4]]
    assert blocks.partial.tolist() == [[False, True], [True, True]]
    torch.testing.assert_close(blocks.sums[0, 0], pixel[:4, :4].sum())
    torch.testing.assert_close(blocks.sums[1, 1], pixel[4:, 4:].sum())
    torch.testing.assert_close(blocks.densities[0, 1], pixel[:4, 4:].mean())
    torch.testing.assert_close(blocks.sums.sum(), pixel.sum())


def test_block_pooling_in_3d_across_slices_and_per_sample():
    volume = torch.rand(3, 5, 6, 6, generator=torch.Generator().manual_seed(0))  # (S, D, H, W)
    blocks = pool_blocks(volume, (2, 3, 3), ndim=3)
    assert blocks.sums.shape == (3, 3, 2, 2)
    torch.testing.assert_close(blocks.sums[1, 2, 1, 0], volume[1, 4:, 3:, :3].sum())
    assert blocks.pixel_counts[2, 0, 0] == 9
    mean, std = blocks.sample_spread(sample_dim=0)
    torch.testing.assert_close(mean, blocks.sums.mean(0))
    torch.testing.assert_close(std, blocks.sums.std(0))


def test_image_score_is_max_and_topk_inside_the_mask():
    pixel = torch.zeros(8, 8)
    pixel[0:2, 0:2] = 100.0  # a hot block outside the body
    pixel[4:6, 4:6] = 3.0
    pixel[6:8, 6:8] = 1.0
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:, 2:] = True
    blocks = pool_blocks(pixel, 2)
    inside = blocks_inside_mask(mask, 2)
    score = image_score(blocks, inside, k=2)
    assert score.max == pytest.approx(3.0)
    assert score.argmax == (2, 2)
    assert score.topk_mean == pytest.approx(2.0)
    assert score.blocks_in_mask == 9
    assert image_score(blocks, inside, k=1, statistic="sum").max == pytest.approx(12.0)


def test_body_mask_from_reconstruction_fills_dark_interior():
    img = torch.zeros(32, 32)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    body = (yy - 16) ** 2 + (xx - 16) ** 2 < 12**2
    img[body] = 1.0
    img[(yy - 16) ** 2 + (xx - 16) ** 2 < 3**2] = 0.0  # a dark ventricle inside
    img[0, 0] = 1.0  # a speck of noise outside
    mask = body_mask(img)
    assert torch.equal(mask, body)


def test_accumulator_memory_state_does_not_depend_on_steps():
    def state_after(n):
        acc = KLIPAccumulator([FULL, Window(0.0, 0.5)])
        for k in range(n):
            acc(_event(k, 1.0 - k / n, torch.ones(2, 1, 8, 8)))
        return acc.state_bytes

    assert state_after(10) == state_after(1000) == 2 * 2 * 8 * 8 * 4 + 2 * 8


def test_normalized_time_window_edges_hold_the_end_steps():
    """t/(T-1) = 0 holds the clean-end step exactly (no exp(log) rounding), t/(T-1) = 1 the noisiest."""
    from klip_med.sampling.schedule import VPSchedule, linear_beta_alphas_cumprod
    from klip_med.score.windows import window_from_normalized_time

    alphas = linear_beta_alphas_cumprod(1000)
    schedule = VPSchedule(alphas)
    first, last = schedule.sigma(999), schedule.sigma(0)
    assert window_from_normalized_time(0.0, 0.5, alphas).contains(last)
    assert window_from_normalized_time(0.5, 1.0, alphas).contains(first)
    mid = window_from_normalized_time(0.25, 0.5, alphas)
    # t/(T-1) = 0.25 and 0.5 sit at timesteps 249.75 and 499.5 of 0..999
    assert mid.contains(schedule.sigma(250)) and mid.contains(schedule.sigma(499))
    assert not mid.contains(schedule.sigma(249)) and not mid.contains(schedule.sigma(500))
    assert window_from_normalized_time(333 / 999, 1.0, alphas).contains(schedule.sigma(333))
