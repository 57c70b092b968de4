"""Issue 18's ghost test: where the KLIP mass of the bundled demo slice lies, by read-out.

One sampling pass of the bundled TCGA-LGG FLAIR slice (``klip-med demo``'s physics and settings: 4x
Cartesian, 4 samples, 50 steps, the nine calibrated windows) fills two accumulators: the default
split of each step's KL over pixels (where the data-consistency correction lands) and the denoiser's
split (:class:`klip_med.sampling.attribution.DenoisedAttribution`, same KL per step). For each it
prints the share of the map's mass in the tumour, in the head outside the tumour and outside the head:

- raw: the nats of the windows ``t:0.1,1`` (their sum);
- z: the positive part of the nine-window z-score map (blocks painted on pixels) under a null model:
  the shipped one for the default split; for the denoiser's split one fitted here on the lesion-free
  slices of ``--dn-null-run`` (an eval run made with ``--readouts denoised``), if given.

    python examples/ghost_test.py --dn-null-run runs/mri4x_dev_readouts
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from klip_med import priors
from klip_med.calibration import resolve_null
from klip_med.calibration.fit import fit_null
from klip_med.calibration.scoring import result_blocks
from klip_med.data.masks import body_mask
from klip_med.eval.cache import run_slices
from klip_med.eval.nulls import cached_blocks
from klip_med.physics import parse_physics
from klip_med.pipeline import CALIBRATED_WINDOWS, KLIPSettings, parse_window, reconstruct_measurement
from klip_med.pipeline.demo import bundled_mri_slice
from klip_med.pipeline.settings import make_sampler
from klip_med.sampling.attribution import DenoisedAttribution
from klip_med.score import KLIPAccumulator
from klip_med.score.blocks import block_to_pixels

PRIOR, PHYSICS = "mri-brain-flair-128", "mri:accel=4,center=0.08,noise=0.01"


def shares(mass: np.ndarray, tumour: np.ndarray, head: np.ndarray) -> tuple[float, float, float]:
    """Fractions of a non-negative (H, W) map's total in the tumour, head minus tumour, outside the head."""
    total = float(mass.sum()) or 1.0
    return (float(mass[tumour].sum()) / total, float(mass[head & ~tumour].sum()) / total,
            float(mass[~head].sum()) / total)


def denoised_null(run: Path, block_size: int):
    """A null model of the denoiser's split, fitted on the lesion-free slices of an eval run with
    ``--readouts denoised`` (its maps ``klip_dn[w]``)."""
    entries = run_slices(run)
    ids = [e for e in entries if e.label == 0]
    d, c, m = zip(*(cached_blocks(e, CALIBRATED_WINDOWS, block_size, prefix="klip_dn") for e in ids), strict=True)
    return fit_null(d, c, m, {"block_size": block_size}, f"{len(ids)} lesion-free slices of {run}",
                    groups=[e.patient for e in ids])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dn-null-run", type=Path, help="eval run with --readouts denoised (dev split)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    prior = priors.load(PRIOR)
    truth, tumour = bundled_mri_slice(prior)
    windows = tuple(parse_window(w, prior.alphas_cumprod) for w in CALIBRATED_WINDOWS)
    settings = KLIPSettings(samples=4, steps=50, windows=windows, seed=args.seed)
    physics = parse_physics(PHYSICS, truth.shape[-1], generator=torch.Generator().manual_seed(args.seed))
    y = physics(truth.reshape(1, *prior.image_shape))
    denoised = KLIPAccumulator(list(windows), normalization=settings.normalization)
    attribution = DenoisedAttribution(make_sampler(prior, settings), [denoised])
    result = reconstruct_measurement(prior, physics, y, settings, observers=[attribution])
    head = np.asarray(body_mask(truth.numpy()), dtype=bool)
    dn_result = replace(result, klip=denoised.result().sample_mean().detach().cpu())
    null, _, _ = resolve_null("auto", PRIOR, prior, PHYSICS, settings)
    nulls = {"default split": null, "denoiser's split": denoised_null(args.dn_null_run, 8) if args.dn_null_run else None}
    print(f"bundled slice, tumour {int(tumour.sum())} px, head {int(head.sum())} px; {PHYSICS}, 4 samples, 50 steps")
    print("| read-out | map | in the tumour | head outside the tumour | outside the head |")
    print("|---|---|---|---|---|")
    for label, res in (("default split", result), ("denoiser's split", dn_result)):
        raw = res.klip.numpy().sum(axis=0)
        rows = [("raw nats, t:0.1,1", raw)]
        if nulls[label] is not None:
            densities, covariates, _ = result_blocks(res, 8)
            z = nulls[label].z_scores(densities, covariates)
            rows.append(("positive z (nine windows)", block_to_pixels(np.clip(z, 0, None), 8, tumour.shape)))
        for name, mass in rows:
            a, b, c = shares(np.asarray(mass, np.float64), tumour, head)
            print(f"| {label} | {name} | {a:.3f} | {b:.3f} | {c:.3f} |")
    print(f"network forwards (batched over the {settings.samples} samples): sampling "
          f"{int(result.metadata['network_calls'])}, the denoiser's split {attribution.network_calls} more")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
