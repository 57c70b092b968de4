"""KLIP in a MONAI scheduler loop: DPS with MONAI's DDIMScheduler on the shipped MRI prior's UNet.

    python examples/monai_scheduler_klip.py --out monai_loop_out        # ~20 s on a 2-core CPU
    python examples/monai_scheduler_klip.py --steps 100 --zeta 1 --eta 1.0

The loop is the one a MONAI user writes around a ``DiffusionModelUNet`` and a scheduler::

    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        eps = unet(x, timesteps=t)
        x, x0 = scheduler.step(eps, t, x, eta, generator)

:class:`klip_med.sampling.monai_scheduler.MonaiDPS` runs exactly that with MONAI's own scheduler
and adds DPS's data pull ``-zeta * grad_x ||y - A x0(x)||`` through MONAI's ``x0``; each step it
replays the step's noise draw on the prior's output alone, so the KLIP accumulator gets
``d_k = x_post - x_prior`` and the step's ``s_k`` (read off ``scheduler.step`` itself). The bundled
TCGA-LGG FLAIR slice (CC BY-NC-SA 4.0, ``klip_med/cases/lgg_flair_demo.json``) is measured with 4x
Cartesian undersampling. DPS is not an exact posterior sampler: its KLIP ranks blocks
(``docs/samplers.md``). The script also prints MONAI's own likelihood baseline
(:func:`klip_med.eval.monai_likelihood.likelihood_kl_maps`) of the reconstruction, summed over a
few timesteps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler

from klip_med import priors
from klip_med.pipeline.demo import bundled_mri_slice
from klip_med.data.masks import body_mask
from klip_med.eval.monai_likelihood import likelihood_kl_maps
from klip_med.physics import baseline_reconstruction, parse_physics
from klip_med.pipeline import parse_window
from klip_med.priors.diffusion import build_scheduler
from klip_med.sampling.monai_scheduler import MonaiDPS
from klip_med.score import KLIPAccumulator

PRIOR = "mri-brain-flair-128"
WINDOWS = ("full", "t:0.3,1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("monai_loop_out"), help="output folder")
    parser.add_argument("--physics", default="mri:accel=4,center=0.08,noise=0.01")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="scheduler.set_timesteps(steps)")
    parser.add_argument("--zeta", type=float, default=1.0, help="DPS step size on the residual norm")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (0: deterministic, SDE normalisation)")
    parser.add_argument("--likelihood-timesteps", type=int, default=8, help="timesteps of the likelihood baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    prior = priors.load(PRIOR, device=args.device)
    shape = tuple(prior.image_shape)
    truth, tumour = bundled_mri_slice(prior, args.device)  # (H, W) prior units, (H, W) bool
    physics = parse_physics(args.physics, shape[-1], device=args.device,
                            generator=torch.Generator(device=args.device).manual_seed(args.seed))
    y = physics(truth.reshape(1, *shape))

    # what a MONAI user has: the network and a scheduler with the prior's training schedule
    unet = prior.unet
    ddpm = prior.config.schedule
    scheduler = DDIMScheduler(num_train_timesteps=ddpm["num_train_timesteps"], schedule=ddpm["schedule"],
                              beta_start=ddpm["beta_start"], beta_end=ddpm["beta_end"], clip_sample=True)

    def model(x, t):
        return unet(x, timesteps=t)

    accumulator = KLIPAccumulator(windows=[parse_window(w, prior.alphas_cumprod) for w in WINDOWS])
    sampler = MonaiDPS(model, scheduler, args.steps, zeta=args.zeta, eta=args.eta)
    result = sampler.sample(y, physics, args.samples, shape, torch.Generator(device=args.device).manual_seed(args.seed + 1),
                            [accumulator])
    maps = accumulator.result()
    klip = maps.pixel_nats.mean(dim=1).cpu().numpy()
    mean = result.mean[0, 0].detach().cpu()
    zero_filled = baseline_reconstruction(physics, y).detach().cpu().reshape(shape)[0]
    body = body_mask(mean).numpy()

    def residual(x: torch.Tensor) -> float:
        return float((physics.A(x.reshape(1, *shape).to(args.device)) - y).norm() / y.norm())

    print(f"sampler         MONAI DDIMScheduler loop + DPS (zeta {args.zeta:g}, eta {args.eta:g}, {args.steps} steps) "
          f"on {PRIOR}'s UNet, physics {args.physics}")
    print(f"events          {maps.steps_per_window[0]} steps, {maps.fallback_steps_per_window[0]} deterministic "
          "(SDE normalisation)")
    for i, name in enumerate(WINDOWS):
        print(f"window {name:<9} {maps.steps_per_window[i]:>3} steps, total {float(klip[i].sum()):.4g} nats, tumour "
              f"{klip[i][tumour].mean():.4g} vs rest of head {klip[i][body & ~tumour].mean():.4g} nats/pixel")
    print(f"data residual   |A x - y| / |y|: sample mean {residual(mean):.3f}, zero-filled {residual(zero_filled):.3f}")
    print(f"error vs truth  {float((mean - truth.cpu()).norm() / truth.cpu().norm()):.3f} (relative L2, prior units)")

    # MONAI's likelihood maps of the reconstruction (a baseline, not KLIP): a few timesteps only
    T = ddpm["num_train_timesteps"]
    picked = np.linspace(0, T - 1, args.likelihood_timesteps).round().astype(int).tolist()
    lik = likelihood_kl_maps(model, build_scheduler(prior.config), mean.reshape(1, *shape).to(args.device),
                             torch.Generator(device=args.device).manual_seed(args.seed + 2), timesteps=picked)
    lik_map = lik.pixel_sum(1).cpu().numpy()[0, 0]  # t >= 1: the Gaussian KL terms, nats per pixel
    print(f"likelihood map  {len(picked)} timesteps; tumour {lik_map[tumour].mean():.4g} vs rest of head "
          f"{lik_map[body & ~tumour].mean():.4g} nats/pixel")
    np.savez_compressed(args.out / "monai_loop_klip.npz", klip=klip, windows=np.array(WINDOWS), likelihood=lik_map,
                        samples=result.samples.detach().cpu().numpy(), tumour=tumour)
    print(f"arrays          {args.out / 'monai_loop_klip.npz'}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
