"""KLIP on deepinv's DiffPIR: the shipped MRI prior inside deepinv's own DiffPIR loop, scored with KLIP.

    python examples/deepinv_diffpir_klip.py --out diffpir_klip_out          # ~20 s on a 2-core CPU
    python examples/deepinv_diffpir_klip.py --steps 100 --samples 4 --zeta 0.3

Nothing of deepinv is forked: :func:`klip_med.sampling.deepinv_pnp.diffpir` hands
``deepinv.sampling.DiffPIR`` the ``mri-brain-flair-128`` prior as a [0, 1] denoiser and reads each
step through the two things DiffPIR calls (the denoiser and the data fidelity's ``prox``). The prior
step differs from DiffPIR's only by the proximal data step, and the step's noise cancels in the
difference, so ``d_k = c_k (x0_prox - x0)`` exactly; ``s_k = sqrt(1 - a_next) sqrt(zeta)``.

DiffPIR works in deepinv's [0, 1] convention: for our [-1, 1] prior the measurement of the [0, 1]
image is ``(y + A 1) / 2`` with half the noise std (the operator is linear). The bundled TCGA-LGG
FLAIR slice (CC BY-NC-SA 4.0, see ``klip_med/cases/lgg_flair_demo.json``) is measured with 4x
Cartesian undersampling. DiffPIR is not an exact posterior sampler: its KLIP ranks blocks, its nats
are not calibrated (``docs/samplers.md``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import deepinv as dinv
import numpy as np
import torch

from klip_med import priors
from klip_med.pipeline.demo import bundled_mri_slice
from klip_med.data.masks import body_mask
from klip_med.physics import baseline_reconstruction, parse_physics
from klip_med.pipeline import parse_window
from klip_med.sampling.deepinv_pnp import diffpir
from klip_med.score import KLIPAccumulator
from klip_med.score.blocks import blocks_inside_mask, image_score, pool_blocks

PRIOR = "mri-brain-flair-128"
WINDOWS = ("full", "t:0.3,1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("diffpir_klip_out"), help="output folder")
    parser.add_argument("--physics", default="mri:accel=4,center=0.08,noise=0.01")
    parser.add_argument("--samples", type=int, default=1, help="posterior samples")
    parser.add_argument("--steps", type=int, default=20, help="DiffPIR steps (one network call each)")
    parser.add_argument("--zeta", type=float, default=0.3, help="DiffPIR's noise fraction zeta")
    parser.add_argument("--lambda", dest="lambda_", type=float, default=7.0, help="DiffPIR's data weight lambda")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    prior = priors.load(PRIOR, device=args.device)
    shape = tuple(prior.image_shape)
    truth, tumour = bundled_mri_slice(prior, args.device)  # (H, W) prior units, (H, W) bool

    def operator():  # the same mask every time: the generator is seeded identically
        return parse_physics(args.physics, shape[-1], device=args.device,
                             generator=torch.Generator(device=args.device).manual_seed(args.seed))

    physics = operator()
    y = physics(truth.reshape(1, *shape))
    # deepinv's [0, 1] convention: A((x + 1) / 2) = (A x + A 1) / 2, noise std halved
    physics01 = operator()
    physics01.noise_model = dinv.physics.GaussianNoise(sigma=float(physics.noise_model.sigma) / 2)
    y01 = (y + physics.A(torch.ones((1, *shape), device=args.device))) / 2

    windows = [parse_window(w, prior.alphas_cumprod) for w in WINDOWS]
    accumulator = KLIPAccumulator(windows=windows)
    model = diffpir(prior, args.steps, [accumulator], zeta=args.zeta, lambda_=args.lambda_)
    generator = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    with torch.no_grad():
        samples = 2 * model(y01.expand(args.samples, *y01.shape[1:]), physics01, generator=generator) - 1

    maps = accumulator.result()
    klip = maps.pixel_nats.mean(dim=1).cpu()
    mean = samples.mean(dim=0)[0].cpu()
    zero_filled = baseline_reconstruction(physics, y).detach().cpu().reshape(shape)[0]
    body = body_mask(mean)
    inside = blocks_inside_mask(body, args.block_size)
    score = image_score(pool_blocks(klip[0], args.block_size), inside if bool(inside.any()) else torch.ones_like(inside))

    def residual(x: torch.Tensor) -> float:
        return float((physics.A(x.reshape(1, *shape).to(args.device)) - y).norm() / y.norm())

    body_np, klip_np = body.numpy(), klip.numpy()
    print(f"sampler         deepinv.sampling.DiffPIR (zeta {args.zeta:g}, lambda {args.lambda_:g}, {args.steps} steps, "
          f"{args.samples} sample{'s' if args.samples > 1 else ''}) on {PRIOR}, physics {args.physics}")
    print(f"events          {sum(maps.steps_per_window[:1])} steps observed; "
          f"{maps.metadata()['sde_fallback_steps_per_window'][0]} deterministic")
    print(f"image score     {score.max:.4g} nats/pixel (max {args.block_size}x{args.block_size} block density "
          "inside the body)")
    for i, name in enumerate(WINDOWS):
        print(f"window {name:<9} {maps.steps_per_window[i]:>3} steps, total {float(klip[i].sum()):.4g} nats, "
              f"tumour {klip_np[i][tumour].mean():.4g} vs rest of head {klip_np[i][body_np & ~tumour].mean():.4g} "
              "nats/pixel")
    print(f"data residual   |A x - y| / |y|: DiffPIR mean {residual(mean):.3f}, zero-filled {residual(zero_filled):.3f}, "
          f"truth {residual(truth.cpu()):.3f}")
    print(f"error vs truth  {float((mean - truth.cpu()).norm() / truth.cpu().norm()):.3f} (relative L2, prior units)")

    np.savez_compressed(args.out / "diffpir_klip.npz", klip=klip_np, windows=np.array(WINDOWS),
                        samples=samples.cpu().numpy(), tumour=tumour)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("truth", truth.cpu(), "gray"), ("zero-filled", zero_filled, "gray"), ("DiffPIR mean", mean, "gray"),
              ("KLIP full (nats/px)", klip[0], "inferno")]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3.1))
    for ax, (title, image, cmap) in zip(axes, panels, strict=True):
        ax.imshow(np.asarray(image), cmap=cmap, **({"vmin": -1, "vmax": 1} if cmap == "gray" else {}))
        ax.contour(tumour, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out / "diffpir_klip.png", dpi=110)
    plt.close(fig)
    print(f"figure          {args.out / 'diffpir_klip.png'}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
