"""The end-to-end step every user surface shares: measure (or take a measurement), sample the
posterior with a prior, accumulate KLIP, pool into blocks, score the image.

    from klip_med import priors
    from klip_med.pipeline import KLIPSettings, reconstruct_image

    prior = priors.load("mri-brain-flair-128")
    out = reconstruct_image(prior, image_model, "mri:accel=4,center=0.08,noise=0.01", KLIPSettings())
    out.recon_mean, out.klip[0], out.score.max   # (H, W) prior units, (H, W) nats/pixel, nats/pixel

Images here are in the prior's working range ([-1, 1], see ``prior.config.intensity``) on its
grid; :mod:`klip_med.io` maps DICOM / NIfTI volumes to and from that grid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.score import FULL, KLIPAccumulator, StepObserver, Window
from klip_med.score.blocks import BlockScores, ImageScore, blocks_inside_mask, body_mask_from_image, image_score
from klip_med.score.blocks import pool_blocks
from klip_med.score.windows import window_from_normalized_time

SAMPLERS = ("fast", "dps")

CALIBRATED_WINDOWS = tuple(f"t:{k / 10:g},{(k + 1) / 10:g}" for k in range(1, 10))
"""The nine windows t/T in [0.1, 0.2], ..., [0.9, 1] whose null z-scores the default map combines
(the last 10% of the run, t < 0.1, is left out: the sampler's deterministic last step dominates it)."""
RUN_WINDOWS = ("t:0.1,1", *CALIBRATED_WINDOWS)
"""Windows of ``klip-med run`` / ``demo`` by default: the span ``t:0.1,1`` first (the headline map in
nats), then :data:`CALIBRATED_WINDOWS` for the null model. Chosen on the development patients only;
see BENCHMARKS.md (issue 8)."""


def parse_window(spec: str, alphas_cumprod: Tensor) -> Window:
    """A window from a CLI string.

    ``full``: every step. ``t:a,b``: normalised diffusion time t/T in [a, b] (0 = clean end).
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
        raise KLIPMedError(f"--window: expected 'full', 't:a,b' or 'sigma:a,b', found {spec!r}")
    if kind == "t":
        return window_from_normalized_time(lo, hi, alphas_cumprod, name=spec)
    if not 0 <= lo < hi:
        raise KLIPMedError(f"--window: expected 0 <= a < b for {spec!r}")
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
    """

    samples: int = 4
    steps: int = 100
    sampler: str = "fast"
    windows: tuple[Window, ...] = (FULL,)
    block_size: int = 8
    normalization: str = "transition"
    top_k: int = 5
    seed: int = 0
    dps_zeta: float = 0.3

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise KLIPMedError(f"sampler: expected one of {SAMPLERS}, found {self.sampler!r}")
        for name in ("samples", "steps", "block_size", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KLIPMedError(f"{name}: expected a positive integer, found {value!r}")
        if not self.windows:
            raise KLIPMedError("windows: expected at least one window, found none")

    def describe(self) -> dict[str, Any]:
        return {
            "samples": self.samples, "steps": self.steps, "sampler": self.sampler,
            "windows": [{"name": w.name, "sigma_min": w.sigma_min,
                         "sigma_max": (None if math.isinf(w.sigma_max) else w.sigma_max)} for w in self.windows],
            "block_size": self.block_size, "normalization": self.normalization, "top_k": self.top_k,
            "seed": self.seed, **({"dps_zeta": self.dps_zeta} if self.sampler == "dps" else {}),
        }


@dataclass
class SliceResult:
    """One slice, reconstructed and scored (all on CPU).

    Attributes:
        baseline: (H, W) measurement-domain reconstruction (zero-filled MRI / FBP CT), prior units.
        recon_mean, recon_std: (H, W) posterior mean and std over the S samples, prior units.
        klip: (n_windows, H, W) KLIP map, nats per pixel, averaged over samples.
        klip_sample_std: (n_windows, H, W) spread of the per-sample maps (nats per pixel).
        blocks: block scores of the first window's map (sums in nats, densities in nats/pixel).
        body_mask: (H, W) bool, from the posterior mean.
        inside: (grid) bool, blocks inside the body.
        score: the image score (max / top-k block density inside the body, nats per pixel).
        metadata: settings, windows, steps per window, network calls, seconds.
    """

    baseline: Tensor
    recon_mean: Tensor
    recon_std: Tensor
    klip: Tensor
    klip_sample_std: Tensor
    blocks: BlockScores
    body_mask: Tensor
    inside: Tensor
    score: ImageScore
    metadata: dict[str, Any] = field(default_factory=dict)

    def top_blocks(self, n: int = 3) -> list[dict[str, Any]]:
        """The ``n`` blocks with the highest density inside the body: row, col (pixels), nats/pixel."""
        density = self.blocks.densities.clone()
        density[~self.inside] = -math.inf
        flat = density.flatten()
        order = torch.argsort(flat, descending=True)[: min(n, int(self.inside.sum()))]
        cols = density.shape[-1]
        size = self.metadata["settings"]["block_size"]
        return [{"row": int(i // cols) * size, "col": int(i % cols) * size, "size": size,
                 "nats_per_pixel": float(flat[i])} for i in order]


def _sampler(prior, settings: KLIPSettings):
    from klip_med.sampling import DDSSampler, DPSSampler

    if settings.sampler == "fast":
        return DDSSampler(prior, n_steps=settings.steps)
    return DPSSampler(prior, n_steps=settings.steps, zeta=settings.dps_zeta)


def check_windows(prior, settings: KLIPSettings) -> None:
    """Raise :class:`KLIPMedError` (before any sampling) if a window holds none of the sampler's steps."""
    sigmas = _sampler(prior, settings).step_sigmas
    for window in settings.windows:
        if not any(window.contains(s) for s in sigmas):
            raise KLIPMedError(
                f"--window {window.label}: expected a window holding at least one of the {settings.steps} "
                f"sampling steps (sigma {min(sigmas):.3g} .. {max(sigmas):.3g}), found none; widen it or "
                "use more --steps"
            )


def default_windows(prior, settings: KLIPSettings) -> tuple[Window, ...]:
    """:data:`RUN_WINDOWS` for ``prior``, keeping those that hold at least one of the sampler's steps
    (a run with very few steps loses fine windows, and with them a matching null model); ``full``
    if none does.

    With DPS the headline window is ``full`` instead of ``t:0.1,1``: under DPS the lesion signal
    sits in the last 10% of the run (MRI 4x dev: ``t:0,0.1`` block AUROC 0.756, ``full`` 0.753,
    every window from ``t:0.1`` on 0.45-0.61; BENCHMARKS.md), the reverse of the fast sampler.
    """
    sigmas = _sampler(prior, settings).step_sigmas
    specs = RUN_WINDOWS if settings.sampler != "dps" else ("full", *CALIBRATED_WINDOWS)
    windows = tuple(w for w in (parse_window(s, prior.alphas_cumprod) for s in specs)
                    if any(w.contains(x) for x in sigmas))
    return windows or (FULL,)


def reconstruct_measurement(prior, physics, y: Tensor, settings: KLIPSettings,
                            generator: torch.Generator | None = None,
                            observers: Sequence[StepObserver] = ()) -> SliceResult:
    """Posterior sampling with KLIP for one measured slice.

    Args:
        prior: a learned prior (``klip_med.priors.load``) or any ``EpsilonPrior`` with ``image_shape``.
        physics: an operator from :func:`klip_med.physics.parse_physics` on the prior's grid.
        y: its measurement, batch 1.
        settings: see :class:`KLIPSettings`.
        generator: randomness of the sampler; default seeded by ``settings.seed``.
        observers: further step observers run in the same sampling pass, after the KLIP
            accumulator (e.g. a second accumulator with another normalisation).
    """
    return reconstruct_batch(prior, physics, y[:1], settings, generator, observers)[0]


def reconstruct_batch(prior, physics, y: Tensor, settings: KLIPSettings,
                      generator: torch.Generator | None = None,
                      observers: Sequence[StepObserver] = ()) -> list[SliceResult]:
    """Posterior sampling with KLIP for B measured slices in one sampler batch of B x S samples.

    Slice ``b`` owns samples ``b*S .. b*S+S-1``; every sampler here treats the samples of a batch
    independently (per-sample data consistency), so each slice's result is a valid posterior run.
    With B = 1 this is exactly :func:`reconstruct_measurement`. The random draws of a batch come
    from one ``generator``: a slice's result depends on the batch it was run in.

    Args:
        y: measurements (B, ...) of one operator ``physics`` (e.g. the slices of a volume).
        generator: randomness of the sampler; default seeded by ``settings.seed``.
        observers: further step observers of the same pass (they see all B x S samples).

    Returns:
        One :class:`SliceResult` per slice; ``metadata["seconds"]`` is the batch time divided by B.
    """
    from klip_med.physics import baseline_reconstruction

    check_windows(prior, settings)
    device = y.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(settings.seed + 1)
    shape = tuple(prior.image_shape)
    n_slices, n_samples = int(y.shape[0]), settings.samples
    accumulator = KLIPAccumulator(windows=list(settings.windows), normalization=settings.normalization)
    start = time.perf_counter()
    y_rows = y if n_slices == 1 else y.repeat_interleave(n_samples, dim=0)
    result = _sampler(prior, settings).sample(y_rows, physics, n_slices * n_samples, shape, generator,
                                              observers=[accumulator, *observers])
    seconds = time.perf_counter() - start
    maps = accumulator.result()
    per_slice = maps.pixel_nats.detach().cpu().reshape(maps.pixel_nats.shape[0], n_slices, n_samples,
                                                        *maps.pixel_nats.shape[2:])
    samples = result.samples.detach().cpu().reshape(n_slices, n_samples, *shape)
    baselines = baseline_reconstruction(physics, y).detach().cpu().reshape(n_slices, *shape)
    out = []
    for b in range(n_slices):
        klip = per_slice[:, b].mean(dim=1)
        klip_std = per_slice[:, b].std(dim=1) if n_samples > 1 else torch.zeros_like(klip)
        mean = samples[b].mean(dim=0)[0]
        std = samples[b].std(dim=0)[0] if n_samples > 1 else torch.zeros_like(mean)
        body = body_mask_from_image(mean)
        blocks = pool_blocks(klip[0], settings.block_size)
        inside = blocks_inside_mask(body, settings.block_size)
        if not bool(inside.any()):  # a slice with no body: score over all blocks rather than none
            inside = torch.ones_like(inside)
        score = image_score(blocks, inside, k=settings.top_k)
        metadata = {
            "settings": settings.describe(), "klip": maps.metadata(), "network_calls": int(result.nfe),
            "seconds": round(seconds / n_slices, 3), "device": str(device),
            "physics": physics.describe() if hasattr(physics, "describe") else type(physics).__name__,
        }
        out.append(SliceResult(baselines[b, 0], mean, std, klip, klip_std, blocks, body, inside, score,
                               metadata))
    return out


def reconstruct_image(prior, image: Tensor, physics_spec: str, settings: KLIPSettings,
                      device: str | torch.device = "cpu") -> tuple[SliceResult, Tensor]:
    """Simulate a measurement of ``image`` with the operator ``physics_spec`` and reconstruct it.

    Args:
        image: (H, W) in prior units on the prior's grid (the ground truth of the simulation).
        physics_spec: e.g. ``"mri:accel=4,center=0.08,noise=0.01"``, ``"ct-sparse:views=60,noise=0.5"``.

    Returns:
        the slice result and the measurement ``y``.
    """
    from klip_med.physics import parse_physics

    shape = tuple(prior.image_shape)
    if tuple(image.shape) != shape[1:]:
        raise KLIPMedError(f"image: expected {shape[1:]} (the prior's grid), found {tuple(image.shape)}")
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    physics = parse_physics(physics_spec, shape[-1], generator=gen, device=device)
    y = physics(image.to(device, torch.float32).reshape(1, *shape))
    result = reconstruct_measurement(prior, physics, y, settings)
    result.metadata["physics_spec"] = physics_spec
    return result, y
