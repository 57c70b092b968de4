"""How a slice is reconstructed and scored: :class:`KLIPSettings`, KLIP windows from their CLI
spelling, the default windows of ``klip-med run``, and the check that each window holds a step.

    from klip_med.pipeline import KLIPSettings, parse_window

    settings = KLIPSettings(samples=4, steps=50, windows=(parse_window("t:0.1,1", prior.alphas_cumprod),))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.score import FULL, Window
from klip_med.score.windows import check_windows_cover_steps, window_from_normalized_time

SAMPLERS = ("fast", "dps")

CALIBRATED_WINDOWS = tuple(f"t:{k / 10:g},{(k + 1) / 10:g}" for k in range(1, 10))
"""The nine windows t/(T-1) in [0.1, 0.2], ..., [0.9, 1] whose null z-scores the default map combines
(the last 10% of the run, t < 0.1, is left out: the sampler's deterministic last step dominates it)."""
RUN_WINDOWS = ("t:0.1,1", *CALIBRATED_WINDOWS)
"""Windows of ``klip-med run`` / ``demo`` by default: the span ``t:0.1,1`` first (the headline map in
nats), then :data:`CALIBRATED_WINDOWS` for the null model. Chosen on the development patients only;
see BENCHMARKS.md (issue 8)."""


def parse_window(spec: str, alphas_cumprod: Tensor) -> Window:
    """A window from a CLI string.

    ``full``: every step. ``t:a,b``: normalised diffusion time t/(T-1) in [a, b] (0 = clean end).
    ``sigma:a,b``: canonical noise level in [a, b] (prior intensity units; ``inf`` allowed).
    """
    spec = spec.strip()
    if spec == "full":
        return FULL
    kind, _, rest = spec.partition(":")
    try:
        lo, hi = (float(v) for v in rest.split(","))
    except ValueError:
        lo = hi = None
    if kind not in ("t", "sigma") or lo is None:
        raise KLIPMedError(f"--windows: expected 'full', 't:a,b' or 'sigma:a,b', found {spec!r}")
    if kind == "t":
        return window_from_normalized_time(lo, hi, alphas_cumprod, name=spec)
    if not 0 <= lo < hi:
        raise KLIPMedError(f"--windows: expected 0 <= a < b for {spec!r}")
    return Window(lo, hi, name=spec)


@dataclass(frozen=True)
class KLIPSettings:
    """How a slice is reconstructed and scored.

    Attributes:
        samples: posterior samples S (run as one batch).
        steps: sampling steps N.
        sampler: ``fast`` (DDS: conjugate-gradient data consistency, no backprop, 1 network call
            per step) or ``dps`` (diffusion posterior sampling, backprop through the network).
        windows: KLIP windows (diffusion-time ranges); the first is the headline map.
        block_size: side of the square blocks the map is pooled into, pixels.
        normalization: KL normalisation (``transition``: exact nats; ``paper``: the KLIP paper's).
        top_k: the image score's top-k mean over blocks inside the body.
        seed: seeds the measurement noise / mask draw and the sampler.
        dps_zeta: DPS step size (DPS only).
        dds_eta: DDIM stochasticity of the fast sampler, in [0, 1] (DDS only).
        dds_gamma: weight of the data term of the fast sampler's proximal step, > 0 (DDS only).
        cg_iters: conjugate-gradient iterations per step of the fast sampler (DDS only).
        clip_x0: optional (low, high) range the denoised estimate is clipped to (both samplers).
    """

    samples: int = 4
    steps: int = 50
    sampler: str = "fast"
    windows: tuple[Window, ...] = (FULL,)
    block_size: int = 8
    normalization: str = "transition"
    top_k: int = 5
    seed: int = 0
    dps_zeta: float = 0.3
    dds_eta: float = 0.85
    dds_gamma: float = 1.0
    cg_iters: int = 5
    clip_x0: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise KLIPMedError(f"sampler: expected one of {SAMPLERS}, found {self.sampler!r}")
        for name in ("samples", "steps", "block_size", "top_k", "cg_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KLIPMedError(f"{name}: expected a positive integer, found {value!r}")
        if not self.windows:
            raise KLIPMedError("windows: expected at least one window, found none")
        if not 0.0 <= self.dds_eta <= 1.0:
            raise KLIPMedError(f"eta: expected a DDIM stochasticity in [0, 1], found {self.dds_eta!r}")
        if not self.dds_gamma > 0:
            raise KLIPMedError(f"gamma: expected a data weight > 0, found {self.dds_gamma!r}")
        if not self.dps_zeta >= 0:
            raise KLIPMedError(f"zeta: expected a DPS step size >= 0, found {self.dps_zeta!r}")
        if self.clip_x0 is not None and not (len(self.clip_x0) == 2 and self.clip_x0[0] < self.clip_x0[1]):
            raise KLIPMedError(f"clip_x0: expected None or a (low, high) pair with low < high, found {self.clip_x0!r}")

    def sampler_parameters(self) -> dict[str, Any]:
        """Every setting of the chosen sampler that changes the maps (a null model's conditions)."""
        clip = None if self.clip_x0 is None else [float(v) for v in self.clip_x0]
        if self.sampler == "dps":
            return {"dps_zeta": self.dps_zeta, "clip_x0": clip}
        return {"dds_eta": self.dds_eta, "dds_gamma": self.dds_gamma, "cg_iters": self.cg_iters, "clip_x0": clip}

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings (windows as :meth:`klip_med.score.Window.as_dict`)."""
        return {
            "samples": self.samples, "steps": self.steps, "sampler": self.sampler,
            "windows": [w.as_dict() for w in self.windows],
            "block_size": self.block_size, "normalization": self.normalization, "top_k": self.top_k,
            "seed": self.seed, **self.sampler_parameters(),
        }


def make_sampler(prior, settings: KLIPSettings):
    """The posterior sampler of ``settings`` on ``prior`` (DDS for ``fast``, DPS for ``dps``)."""
    from klip_med.sampling import DDSSampler, DPSSampler

    if settings.sampler == "fast":
        return DDSSampler(prior, n_steps=settings.steps, eta=settings.dds_eta, gamma=settings.dds_gamma,
                          cg_iters=settings.cg_iters, clip_x0=settings.clip_x0)
    return DPSSampler(prior, n_steps=settings.steps, zeta=settings.dps_zeta, clip_x0=settings.clip_x0)


def check_windows(prior, settings: KLIPSettings) -> None:
    """Raise :class:`KLIPMedError` (before any sampling) if a window holds none of the sampler's steps."""
    check_windows_cover_steps(settings.windows, make_sampler(prior, settings).step_sigmas, argument="--windows",
                              hint="; widen it or use more --steps")


def default_windows(prior, settings: KLIPSettings) -> tuple[Window, ...]:
    """:data:`RUN_WINDOWS` for ``prior``, keeping those that hold at least one of the sampler's steps
    (a run with very few steps loses fine windows, and with them a matching null model); ``full``
    if none does.

    With DPS the headline window is ``full`` instead of ``t:0.1,1``: under DPS the lesion signal
    sits in the last 10% of the run (MRI 4x dev: ``t:0,0.1`` block AUROC 0.756, ``full`` 0.753,
    every window from ``t:0.1`` on 0.45-0.61; BENCHMARKS.md), the reverse of the fast sampler.
    """
    sigmas = make_sampler(prior, settings).step_sigmas
    specs = RUN_WINDOWS if settings.sampler != "dps" else ("full", *CALIBRATED_WINDOWS)
    windows = tuple(w for w in (parse_window(s, prior.alphas_cumprod) for s in specs)
                    if any(w.contains(x) for x in sigmas))
    return windows or (FULL,)
