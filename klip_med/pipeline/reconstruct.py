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

from klip_med.data.masks import body_mask
from klip_med.errors import KLIPMedError
from klip_med.pipeline.settings import KLIPSettings, check_windows, make_sampler
from klip_med.score import KLIPAccumulator, StepObserver
from klip_med.score.blocks import BlockScores, ImageScore, blocks_inside_mask, image_score, pool_blocks


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
    result = make_sampler(prior, settings).sample(y_rows, physics, n_slices * n_samples, shape, generator,
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
        body = body_mask(mean)
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
