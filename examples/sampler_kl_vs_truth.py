"""How far each posterior sampler's chain KL lands from the closed-form KL.

Run:  .venv/bin/python examples/sampler_kl_vs_truth.py      (about a minute on a 2-core CPU)

Only the exact-score sampler is a true posterior sampler, so only it reaches the closed form;
DPS, DDS and deepinv's DPS are approximations whose KLIP maps rank blocks rather than measure
calibrated nats. The table shows by how much, and how close each gets to the exact posterior mean.
"""

from __future__ import annotations

import torch

from klip_med.priors.gaussian_case import SIZE, make_case
from klip_med.sampling import DDSSampler, DPSSampler, ScoreGuidedSampler
from klip_med.sampling.deepinv_adapter import deepinv_dps
from klip_med.score import KLIPAccumulator

SHAPE = (1, SIZE, SIZE)
SAMPLES = 64


def main() -> None:
    case = make_case()
    exact = case.posterior.kl_to(case.prior)
    truth_mean = case.posterior.mean.to(torch.float32)
    print(f"closed-form KL = {exact:.2f} nats; {SAMPLES} samples per run")
    print(f"{'sampler':<34} {'chain KL (nats)':>16} {'ratio':>8} {'mean err':>9}")

    def show(name, acc, samples):
        kl = float(acc.result().pixel_nats[0].sum(dim=(1, 2)).mean())
        err = float((samples.reshape(SAMPLES, -1).mean(0) - truth_mean).norm() / truth_mean.norm())
        print(f"{name:<34} {kl:>16.1f} {kl / exact:>8.3f} {err:>9.3f}")

    runs = {
        "exact score, 1000 steps": ScoreGuidedSampler(case.prior, case.posterior.eps, 1000),
        "DPS zeta=0.3, 1000 steps": DPSSampler(case.prior, 1000, zeta=0.3),
        "DPS zeta=1.0, 1000 steps": DPSSampler(case.prior, 1000, zeta=1.0),
        "DDS gamma=1, 100 steps": DDSSampler(case.prior, 100, gamma=1.0, cg_iters=10),
        "DDS gamma=10, 100 steps": DDSSampler(case.prior, 100, gamma=10.0, cg_iters=10),
        "DDS eta=0 (sde fallback), 100 st.": DDSSampler(case.prior, 100, eta=0.0, cg_iters=10),
    }
    for name, sampler in runs.items():
        acc = KLIPAccumulator()
        result = sampler.sample(case.y, case.physics, SAMPLES, SHAPE, torch.Generator().manual_seed(1), [acc])
        show(name, acc, result.samples)
    for weight in (0.3, 1.0):
        acc = KLIPAccumulator()
        model = deepinv_dps(case.prior, 1000, [acc], weight=weight,
                            generator=torch.Generator().manual_seed(0), clip=(-10.0, 10.0))
        samples = model(case.y.expand(SAMPLES, -1), case.physics, x_init=(SAMPLES, *SHAPE))
        show(f"deepinv DPS weight={weight}, 1000 steps", acc, samples)


if __name__ == "__main__":
    main()
