"""Streaming memory (measured) and parity with the reference implementation's formula."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from klip_med.priors.gaussian_case import SIZE, make_case
from klip_med.sampling import DPSSampler
from klip_med.score import KLIPAccumulator, TrajectoryRecorder, Window, pool_blocks, window_from_step_indices

_RSS_PROBE = textwrap.dedent(
    """
    import json, torch
    from klip_med.score import KLIPAccumulator, StepEvent, TrajectoryRecorder, Window

    def reset_peak():  # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def peak_mib():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0

    def feed(observer, n):
        g = torch.Generator().manual_seed(0)
        for k in range(n):
            d = torch.randn(4, 1, 64, 64, generator=g)
            observer(StepEvent(index=k, sigma=2.0 * (n - k) / n, noise_std=torch.tensor(0.1),
                               delta=d, x=d.clone(), x0_hat=d.clone(), g=0.1, dt=1.0))

    windows = [Window(0, 1e9), Window(0, 1.0), Window(0.5, 1.5)]
    feed(KLIPAccumulator(windows), 10)  # warm up the allocator
    reset_peak()
    feed(KLIPAccumulator(windows), 10)
    after_10 = peak_mib()
    reset_peak()
    feed(KLIPAccumulator(windows), 1000)
    after_1000 = peak_mib()
    reset_peak()
    recorder = TrajectoryRecorder()
    feed(recorder, 1000)
    after_recorder = peak_mib()
    print(json.dumps([after_10, after_1000, after_recorder]))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_streaming_accumulation_of_1000_steps_allocates_no_more_than_10():
    """Peak resident memory (Linux VmHWM, reset before each phase) of a fresh process.

    Streaming 1000 steps of (S=4, 64x64) deltas into three windows must not raise the peak over
    streaming 10 steps (allowance: 8 MiB of allocator noise). The positive control, a recorder
    that keeps the trajectory (3 tensors x 1000 steps x 64 KiB = 188 MiB), shows the measurement
    sees growth when there is some.
    """
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, check=True
    )
    after_10, after_1000, after_recorder = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_1000 - after_10 < 8.0, (after_10, after_1000)
    assert after_recorder - after_1000 > 150.0, (after_1000, after_recorder)


def _reference_klip(updates: torch.Tensor, g: torch.Tensor, block: int, t_start: int, t_end: int):
    """The reference formula, written out naively (voilalab/KLIP pipeline/scoring/aggregate.py).

    updates: (T, S, C, H, W) raw per-step updates; g: (T,) normaliser per step.
    Normalise by g, slice the window, square, sum over the block's pixels and channels, mean
    over steps and samples.
    """
    normalized = updates / g.reshape(-1, 1, 1, 1, 1)
    T, S, C, H, W = normalized.shape
    out = torch.zeros(H // block, W // block, dtype=torch.float64)
    for bi in range(H // block):
        for bj in range(W // block):
            total = 0.0
            count = 0
            for t in range(t_start, t_end):
                for s in range(S):
                    patch = normalized[t, s, :, bi * block : (bi + 1) * block, bj * block : (bj + 1) * block]
                    total += float((patch.to(torch.float64) ** 2).sum())
                    count += 1
            out[bi, bj] = total / count
    return out


def test_paper_normalisation_equals_the_reference_formula_on_a_recorded_trajectory():
    case = make_case()
    recorder = TrajectoryRecorder()
    sampler = DPSSampler(case.prior, 40, zeta=0.3)
    sigmas = sampler.step_sigmas
    t_start, t_end = 10, 25  # steps [10, 25) in sampling order
    window = window_from_step_indices(t_start, t_end - 1, sigmas)  # half-open: [sigma_last, sigma_before_first)
    acc = KLIPAccumulator([window], normalization="paper")
    sampler.sample(case.y, case.physics, 3, (1, SIZE, SIZE), torch.Generator().manual_seed(5), [recorder, acc])
    updates = torch.stack([e.delta for e in recorder.events])
    g = torch.tensor([e.g for e in recorder.events])
    expected = _reference_klip(updates, g, 4, t_start, t_end)
    ours = pool_blocks(acc.result().pixel_nats[0].mean(dim=0), 4).sums.to(torch.float64)
    assert acc.result().steps_per_window == (t_end - t_start,)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_square_of_mean_equals_the_reference_padis_path():
    """PaDIS path: updates averaged over runs first, then normalised, squared, block-summed."""
    case = make_case()
    recorder = TrajectoryRecorder()
    acc = KLIPAccumulator([Window(0.0, 1e9)], normalization="paper", combine="square_of_mean")
    DPSSampler(case.prior, 20, zeta=0.3).sample(
        case.y, case.physics, 4, (1, SIZE, SIZE), torch.Generator().manual_seed(2), [recorder, acc]
    )
    mean_updates = torch.stack([e.delta.mean(dim=0, keepdim=True) for e in recorder.events])
    g = torch.tensor([e.g for e in recorder.events])
    expected = _reference_klip(mean_updates, g, 4, 0, len(recorder.events))
    ours = pool_blocks(acc.result().pixel_nats[0, 0], 4).sums.to(torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
