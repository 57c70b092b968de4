"""The timed runs of a benchmark: our sampler with and without the KLIP accumulator, the
accumulator on its own, the stored-trajectory reference, and deepinv's DPS.

Every run starts from a generator seeded with the same seed, so with / without KLIP draw the same
numbers and give the same samples. Shapes: B slices x S samples run as one (B*S, C, H, W) batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from klip_med.bench.case import BenchCase
from klip_med.bench.settings import BenchSettings
from klip_med.bench.timing import Clock
from klip_med.score import KLIPAccumulator, StepEvent
from klip_med.score.kl import sde_variance


def make_sampler(prior, settings: BenchSettings, steps: int | None = None):
    """Our sampler as ``klip-med run`` builds it (:func:`klip_med.pipeline.make_sampler`)."""
    from dataclasses import replace

    from klip_med.pipeline.settings import make_sampler as pipeline_sampler

    klip = settings.klip_settings()
    return pipeline_sampler(prior, klip if steps is None else replace(klip, steps=steps))


def make_windows(specs: Sequence[str], prior) -> list:
    from klip_med.pipeline.settings import parse_window

    return [parse_window(spec, prior.alphas_cumprod) for spec in specs]


@dataclass
class Runner:
    """Runs our sampler on a case with fixed settings.

    Attributes:
        case: the measured slice(s); ``settings`` the benchmark settings; ``clock`` the timer.
    """

    case: BenchCase
    settings: BenchSettings
    clock: Clock

    @property
    def rows(self) -> int:
        """B x S, the batch the network sees."""
        return self.settings.batch * self.settings.samples

    def y_rows(self) -> Tensor:
        """(B*S, ...) measurements: slice b's row repeated for its S samples."""
        y = self.case.y
        return y if self.settings.batch == 1 else y.repeat_interleave(self.settings.samples, dim=0)

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.settings.device).manual_seed(self.settings.seed + 1)

    def run(self, prior, observers: Sequence = (), steps: int | None = None):
        """One timed sampling run: ``(SampleResult, seconds)``."""
        sampler = make_sampler(prior, self.settings, steps)
        shape = tuple(prior.image_shape)
        y = self.y_rows()
        return self.clock.time(lambda: sampler.sample(y, self.case.physics, self.rows, shape,
                                                      self.generator(), observers=list(observers)))

    def accumulator(self, prior) -> KLIPAccumulator:
        return KLIPAccumulator(windows=make_windows(self.settings.windows, prior),
                               normalization=self.settings.normalization)


def accumulator_alone(runner: Runner, prior, n_calls: int) -> dict:
    """Seconds per step of the accumulator on its own, fed synthetic events of the run's shape.

    On a loaded machine the with / without difference of whole runs is noisier than the
    accumulator's cost; this isolates it.
    """
    device = runner.settings.device
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (runner.rows, *prior.image_shape)
    sigmas = make_sampler(prior, runner.settings).step_sigmas
    delta = torch.randn(shape, generator=gen, device=device)
    noise = torch.full((), 0.1, device=device)
    events = [StepEvent(index=k, sigma=sigmas[k % len(sigmas)], noise_std=noise, delta=delta, x=delta,
                        g=0.1, dt=1.0) for k in range(n_calls)]
    acc = runner.accumulator(prior)
    acc(events[0])  # warm the kernels up outside the timing (the sums are allocated again below)
    acc.reset()

    def feed() -> None:
        for event in events:
            acc(event)

    _, seconds = runner.clock.time(feed)
    return {"accumulator_seconds_per_step": seconds / n_calls, "accumulator_state_bytes": acc.state_bytes}


class TrajectoryStore:
    """The reference approach: keep every step's update ``d_k`` (T, S, C, H, W), score afterwards.

    ``__call__`` is the step observer; :meth:`score` turns the stored steps into the same
    per-pixel maps as :class:`~klip_med.score.KLIPAccumulator` (transition normalisation),
    ``(n_windows, S, H, W)`` nats.
    """

    def __init__(self) -> None:
        self.deltas: list[Tensor] = []
        self.noise_var: list[Tensor] = []
        self.sigmas: list[float] = []

    def __call__(self, event: StepEvent) -> None:
        self.deltas.append(event.delta.detach())
        var = torch.as_tensor(event.noise_std, dtype=torch.float32).square()
        if event.g is not None and event.dt is not None:
            var = torch.where(var > 0, var, torch.full_like(var, sde_variance(event.g, event.dt)))
        self.noise_var.append(var.expand(event.delta.shape[0]))
        self.sigmas.append(event.sigma)

    @property
    def bytes(self) -> int:
        """Bytes of the stored updates: T x S x C x H x W x 4 (float32)."""
        return sum(d.numel() * d.element_size() for d in self.deltas)

    def score(self, windows) -> Tensor:
        trajectory = torch.stack(self.deltas)  # (T, S, C, H, W)
        var = torch.stack(self.noise_var)  # (T, S)
        per_step = trajectory.square().sum(dim=2) / (2.0 * var[:, :, None, None])  # (T, S, H, W)
        maps = []
        for window in windows:
            inside = torch.tensor([window.contains(s) for s in self.sigmas], device=per_step.device)
            maps.append(per_step[inside].sum(dim=0))
        return torch.stack(maps)


def relative_difference(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|`` (0 when both are 0)."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())
