"""The streaming KLIP accumulator: a thin stateful shell around :mod:`klip_med.score.kl`.

It keeps one running per-pixel sum per (window, posterior sample), so its memory is
``n_windows x S x H x W`` floats whatever the number of steps: never the (T, S, C, H, W)
trajectory the reference implementation stores. All windows fill in the same sampling pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.score.events import StepEvent
from klip_med.score.kl import check_combine, check_normalization, step_pixel_kl
from klip_med.score.windows import FULL, Window


@dataclass(frozen=True)
class KLIPMaps:
    """Per-pixel KLIP maps of one sampling run.

    Attributes:
        pixel_nats: (n_windows, S, H, W) float32. For ``transition`` / ``sde``: nats per pixel
            summed over the window's steps and the image channels. For ``paper``: the reference's
            squared normalised update, summed over channels and averaged over the window's steps.
            ``S`` is the number of posterior samples (1 for ``combine="square_of_mean"``).
        windows: the windows, in the order of the first axis.
        normalization, combine: how the maps were made (see :mod:`klip_med.score.kl`).
        steps_per_window: how many sampling steps fell in each window.
        fallback_steps_per_window: how many of those were deterministic (``s_k = 0``) and used the
            SDE normalisation ``s_k^2 := g^2 dt`` instead of the transition KL.
    """

    pixel_nats: Tensor
    windows: tuple[Window, ...]
    normalization: str
    combine: str
    steps_per_window: tuple[int, ...]
    fallback_steps_per_window: tuple[int, ...]

    def sample_mean(self) -> Tensor:
        """Map averaged over posterior samples, (n_windows, H, W)."""
        return self.pixel_nats.mean(dim=1)

    def sample_std(self) -> Tensor:
        """Per-pixel spread across posterior samples (unbiased std), (n_windows, H, W); zeros if S=1."""
        if self.pixel_nats.shape[1] < 2:
            return torch.zeros_like(self.pixel_nats[:, 0])
        return self.pixel_nats.std(dim=1)

    def window_index(self, window: Window | str) -> int:
        """Index of a window given itself or its label."""
        for i, w in enumerate(self.windows):
            if w == window or w.label == window:
                return i
        labels = [w.label for w in self.windows]
        raise KLIPMedError(f"window: expected one of {labels}, found {window!r}")

    def metadata(self) -> dict:
        """JSON-ready description of how the maps were made (units, windows, fallbacks)."""
        units = "nats" if self.normalization != "paper" else "reference units (mean (d/g)^2)"
        notes = []
        if any(self.fallback_steps_per_window):
            notes.append(
                "deterministic steps (s_k = 0) have no transition KL; they used the SDE "
                "normalisation s_k^2 := g(t_k)^2 dt"
            )
        return {
            "normalization": self.normalization,
            "combine": self.combine,
            "units": units,
            "windows": [w.as_dict() for w in self.windows],
            "steps_per_window": list(self.steps_per_window),
            "sde_fallback_steps_per_window": list(self.fallback_steps_per_window),
            "notes": notes,
        }


@dataclass
class KLIPAccumulator:
    """A :class:`~klip_med.score.events.StepObserver` that accumulates KLIP maps while sampling.

    Args:
        windows: windows on the canonical sigma axis; all are filled in one pass.
            Defaults to the full window.
        normalization: ``"transition"`` (default, nats), ``"sde"`` or ``"paper"``.
        combine: ``"mean"`` (default) or ``"square_of_mean"``.

    Memory: ``len(windows) * S * H * W`` float32 for the sums, plus one (S, H, W) temporary per
    step; independent of the number of steps.
    """

    windows: Sequence[Window] = (FULL,)
    normalization: str = "transition"
    combine: str = "mean"
    _sums: Tensor | None = field(default=None, init=False, repr=False)
    _steps: list[int] = field(default_factory=list, init=False, repr=False)
    _fallbacks: Tensor | None = field(default=None, init=False, repr=False)
    _missing_sde_info: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.windows = tuple(self.windows)
        if not self.windows:
            raise KLIPMedError("windows: expected at least one Window, found an empty sequence")
        for i, w in enumerate(self.windows):
            if not isinstance(w, Window):
                raise KLIPMedError(f"windows[{i}]: expected a klip_med.score.Window, found {w!r}")
        check_normalization(self.normalization)
        check_combine(self.combine)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._sums = None
        self._steps = [0] * len(self.windows)
        self._fallbacks = None
        self._missing_sde_info = False

    @property
    def state_bytes(self) -> int:
        """Bytes held by the running sums (0 before the first step)."""
        held = 0
        for t in (self._sums, self._fallbacks):
            if t is not None:
                held += t.numel() * t.element_size()
        return held

    def __call__(self, event: StepEvent) -> None:
        members = [i for i, w in enumerate(self.windows) if w.contains(event.sigma)]
        if not members:
            return
        contribution, fell_back = step_pixel_kl(
            event.delta,
            event.noise_std,
            normalization=self.normalization,
            combine=self.combine,
            g=event.g,
            dt=event.dt,
        )
        if self._sums is None:
            self._sums = torch.zeros(
                (len(self.windows), *contribution.shape),
                dtype=torch.float32,
                device=contribution.device,
            )
            self._fallbacks = torch.zeros(
                len(self.windows), dtype=torch.int64, device=contribution.device
            )
        elif self._sums.shape[1:] != contribution.shape:
            raise KLIPMedError(
                f"event {event.index}: expected delta of {self._sums.shape[1]} samples and image "
                f"{tuple(self._sums.shape[2:])} like the earlier steps, found contribution of shape "
                f"{tuple(contribution.shape)}"
            )
        if event.g is None or event.dt is None:
            self._missing_sde_info = True
        contribution = contribution.to(torch.float32)
        for i in members:
            self._sums[i].add_(contribution)
            self._fallbacks[i].add_(fell_back.to(torch.int64))
            self._steps[i] += 1

    def result(self) -> KLIPMaps:
        """The maps accumulated so far.

        Raises:
            KLIPMedError: when no step has been seen, when a window received no step, or when a
                deterministic step came without ``g`` / ``dt`` to fall back on.
        """
        if self._sums is None:
            raise KLIPMedError(
                "KLIPAccumulator: expected at least one step event inside a window, found none "
                "(was the accumulator passed to the sampler's observers?)"
            )
        empty = [w.label for w, n in zip(self.windows, self._steps, strict=True) if n == 0]
        if empty:
            raise KLIPMedError(
                f"windows {empty}: expected each window to hold at least one sampling step, "
                "found none; check the windows against the sampler's step_sigmas"
            )
        fallbacks = tuple(int(n) for n in self._fallbacks.tolist())
        if self._missing_sde_info and any(fallbacks):
            raise KLIPMedError(
                "StepEvent.g / StepEvent.dt: expected for deterministic steps (s_k = 0), whose KL "
                "needs the SDE normalisation, found None"
            )
        sums = self._sums.clone()
        if self.normalization == "paper":
            counts = torch.tensor(self._steps, dtype=sums.dtype, device=sums.device)
            sums = sums / counts.reshape(-1, 1, 1, 1)
        return KLIPMaps(
            pixel_nats=sums,
            windows=self.windows,
            normalization=self.normalization,
            combine=self.combine,
            steps_per_window=tuple(self._steps),
            fallback_steps_per_window=fallbacks,
        )


def klip_pixel_map(
    events: Iterable[StepEvent],
    windows: Sequence[Window] = (FULL,),
    normalization: str = "transition",
    combine: str = "mean",
) -> Tensor:
    """KLIP per-pixel maps from recorded step events.

    Args:
        events: the step events of one sampling run.
        windows: windows on the canonical sigma axis.
        normalization: ``"transition"`` (default), ``"sde"`` or ``"paper"``.
        combine: ``"mean"`` (default) or ``"square_of_mean"``.

    Returns:
        (n_windows, S, H, W) float32: per-pixel nats summed over channels and over the window's
        steps (``paper``: averaged over the window's steps).
    """
    acc = KLIPAccumulator(windows, normalization=normalization, combine=combine)
    for event in events:
        acc(event)
    return acc.result().pixel_nats
