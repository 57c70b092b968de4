"""How far each sampler adapter's chain KL lands from the closed-form KL (deepinv and MONAI samplers).

Run:  .venv/bin/python examples/adapters_kl_vs_truth.py                 (about a minute on a 2-core CPU)
      .venv/bin/python examples/adapters_kl_vs_truth.py --steps 1000 --samples 64    (the numbers in docs/samplers.md)

The closed-form Gaussian case of ``klip-med verify`` (16x16, block-diagonal prior, y = A x + n) with
the exact denoiser, so every sampler runs on a perfect prior: only the posterior approximation and
the discretisation separate its chain KL from KL(posterior || prior). Samplers with the exact
posterior score (deepinv's moment matching, the MONAI loop with the exact posterior model) should
reach the closed form as steps grow; the others are approximations whose maps rank blocks.
"""

from __future__ import annotations

import argparse
import time

import deepinv as dinv
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from klip_med.priors.gaussian_case import SIZE, make_case
from klip_med.sampling.deepinv_pnp import ddrm, diffpir
from klip_med.sampling.deepinv_sde import posterior_diffusion
from klip_med.sampling.monai_scheduler import MonaiDPS, MonaiScoreGuided
from klip_med.score import KLIPAccumulator

SHAPE = (1, SIZE, SIZE)


def physics_for(case, noise_sigma: float, decomposable: bool = False):
    """The case's matrix as a deepinv operator (any dtype; an SVD DecomposablePhysics for DDRM)."""
    A = case.A.to(torch.float64)
    if not decomposable:
        return dinv.physics.LinearPhysics(
            A=lambda x: x.reshape(x.shape[0], -1) @ A.to(x.dtype).T,
            A_adjoint=lambda y: (y @ A.to(y.dtype)).reshape(y.shape[0], *SHAPE),
            noise_model=dinv.physics.GaussianNoise(sigma=noise_sigma))
    U, s, Vh = torch.linalg.svd(A, full_matrices=True)
    m, n = A.shape
    mask = torch.zeros(n, dtype=torch.float64)
    mask[:m] = s

    def u_adjoint(y):
        z = torch.zeros(y.shape[0], n, dtype=torch.float64)
        z[:, :m] = y.double() @ U
        return z.to(y.dtype).reshape(y.shape[0], *SHAPE)

    physics = dinv.physics.DecomposablePhysics(
        U=lambda x: (x.reshape(x.shape[0], -1)[:, :m].double() @ U.T).to(x.dtype), U_adjoint=u_adjoint,
        V=lambda x: (x.reshape(x.shape[0], -1).double() @ Vh).to(x.dtype).reshape(x.shape),
        V_adjoint=lambda x: (x.reshape(x.shape[0], -1).double() @ Vh.T).to(x.dtype).reshape(x.shape),
        mask=mask.reshape(1, *SHAPE).to(torch.float32))
    physics.noise_model = dinv.physics.GaussianNoise(sigma=noise_sigma)
    return physics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--only", default="", help="comma-separated name prefixes to run")
    args = parser.parse_args(argv)
    S, N = args.samples, args.steps
    case = make_case()
    exact = case.posterior.kl_to(case.prior)
    truth = case.posterior.mean.to(torch.float32)
    physics = physics_for(case, case.noise_sigma)
    half = physics_for(case, case.noise_sigma / 2)
    svd = physics_for(case, case.noise_sigma / 2, decomposable=True)
    y64 = case.y.expand(S, -1).to(torch.float64)
    unit = (case.y + half.A(torch.ones((1, *SHAPE)))) / 2  # deepinv's [0, 1] convention (DiffPIR, DDRM)
    unit_svd = (case.y + svd.A(torch.ones((1, *SHAPE)))) / 2

    def gen():
        return torch.Generator().manual_seed(0)

    def pd(fidelity, solver, **kw):
        def run(observers):
            model = posterior_diffusion(case.prior, N, observers, fidelity=fidelity, solver=solver, generator=gen(),
                                        cg_max_iter=50, **kw)
            return model(y64, physics, x_init=(S, *SHAPE))
        return run

    runs = {
        "deepinv PD moment-matching ddpm": pd("moment-matching", "ddpm"),
        "deepinv PD moment-matching euler": pd("moment-matching", "euler"),
        "deepinv PD moment-matching heun": pd("moment-matching", "heun"),
        "deepinv PD moment-matching ddim (eta 0, sde)": pd("moment-matching", "ddim"),
        "deepinv PD pigdm ddpm": pd("pigdm", "ddpm"),
        "deepinv PD dps-annealed ddpm": pd("dps-annealed", "ddpm"),
        "deepinv PD dps (norm, weight 1) ddpm": pd("dps", "ddpm"),
        "deepinv PD score-sde ddpm": pd("score-sde", "ddpm"),
        "deepinv DiffPIR zeta 0.1": lambda obs: 2 * diffpir(case.prior, N, obs, zeta=0.1)(
            unit.expand(S, -1), half, generator=gen()) - 1,
        "deepinv DiffPIR zeta 1.0": lambda obs: 2 * diffpir(case.prior, N, obs, zeta=1.0)(
            unit.expand(S, -1), half, generator=gen()) - 1,
        "deepinv DDRM eta 0.85": lambda obs: 2 * ddrm(case.prior, N, obs, eta=0.85)(
            unit_svd.expand(S, -1), svd, generator=gen()) - 1,
        "deepinv DDRM eta 1.0": lambda obs: 2 * ddrm(case.prior, N, obs, eta=1.0)(
            unit_svd.expand(S, -1), svd, generator=gen()) - 1,
        "MONAI DDPMScheduler exact posterior": lambda obs: MonaiScoreGuided(
            case.prior.eps, case.posterior.eps, DDPMScheduler(1000, clip_sample=False), N).sample(
            case.y, case.physics, S, SHAPE, gen(), obs).samples,
        "MONAI DDIMScheduler eta 1 exact posterior": lambda obs: MonaiScoreGuided(
            case.prior.eps, case.posterior.eps, DDIMScheduler(1000, clip_sample=False), N, eta=1.0).sample(
            case.y, case.physics, S, SHAPE, gen(), obs).samples,
        "MONAI DDIMScheduler eta 0 exact (sde)": lambda obs: MonaiScoreGuided(
            case.prior.eps, case.posterior.eps, DDIMScheduler(1000, clip_sample=False), N, eta=0.0).sample(
            case.y, case.physics, S, SHAPE, gen(), obs).samples,
        "MONAI DDIMScheduler eta 1 DPS zeta 0.3": lambda obs: MonaiDPS(
            case.prior.eps, DDIMScheduler(1000), N, zeta=0.3, eta=1.0).sample(
            case.y, case.physics, S, SHAPE, gen(), obs).samples,
    }
    only = [p for p in args.only.split(",") if p]
    print(f"closed-form KL(posterior || prior) = {exact:.2f} nats; {N} steps, {S} samples per run")
    print(f"{'sampler':<46} {'chain KL (nats)':>18} {'ratio':>7} {'mean err':>9} {'time':>7}")
    for name, run in runs.items():
        if only and not any(name.startswith(p) for p in only):
            continue
        acc = KLIPAccumulator()
        start = time.perf_counter()
        samples = run([acc]).to(torch.float32)
        per = acc.result().pixel_nats[0].sum(dim=(1, 2)).to(torch.float64)
        kl, se = float(per.mean()), float(per.std() / S**0.5)
        err = float((samples.reshape(S, -1).mean(0) - truth).norm() / truth.norm())
        print(f"{name:<46} {kl:>9.1f} +- {se:<6.1f} {kl / exact:>7.3f} {err:>9.3f} {time.perf_counter() - start:>6.1f}s",
              flush=True)


if __name__ == "__main__":
    main()
