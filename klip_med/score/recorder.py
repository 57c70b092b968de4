"""An observer that keeps every step event: for tests, figures and parity checks.

It stores the full trajectory, O(n_steps x S x C x H x W) memory: exactly what the streaming
accumulator avoids. Use it on small problems only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from klip_med.score.events import StepEvent


@dataclass
class TrajectoryRecorder:
    """A StepObserver that stores detached copies of every event, in order."""

    events: list[StepEvent] = field(default_factory=list)

    def __call__(self, event: StepEvent) -> None:
        self.events.append(
            StepEvent(
                index=event.index,
                sigma=event.sigma,
                noise_std=event.noise_std.detach().clone(),
                delta=event.delta.detach().clone(),
                x=event.x.detach().clone(),
                x0_hat=None if event.x0_hat is None else event.x0_hat.detach().clone(),
                g=event.g,
                dt=event.dt,
            )
        )

    def __len__(self) -> int:
        return len(self.events)
