"""Where the DDS data-consistency correction lands for Cartesian MRI (issue 18, research log section 9).

The correction ``x0_dc - x0_hat = (A^H A + I / gamma)^-1 A^H (y - A x0_hat)`` is a k-space filter
supported on the sampled phase-encode lines, so for a lesion the prior did not predict it lands on
the lesion and, aliased, along the lesion's rows, whatever ``gamma`` and however many CG iterations
(beyond convergence). The same proximal step is a split-Gibbs sampler's likelihood step, so neither
tuning DDS nor switching to split-Gibbs can make the per-pixel KL local: these tests pin that claim.
"""

from __future__ import annotations

import pytest
import torch

from klip_med.physics.spec import parse_physics
from klip_med.sampling.cg import proximal_cg

SIZE = 64


def _shares(spec: str, gamma: float, cg_iters: int) -> tuple[float, float, float, torch.Tensor]:
    """(lesion share, share on the lesion's rows outside it, share elsewhere, correction) of the
    correction's energy for an 8x8 lesion absent from ``x0_hat``."""
    physics = parse_physics(spec, SIZE)
    x0_hat = torch.zeros(1, 1, SIZE, SIZE)
    truth = torch.zeros_like(x0_hat)
    truth[..., 28:36, 20:28] = 1.0
    y = physics.A(truth)
    correction = (proximal_cg(physics.A, physics.A_adjoint, y, x0_hat, gamma, cg_iters) - x0_hat)[0, 0]
    energy = correction ** 2
    lesion = truth[0, 0] > 0
    rows = torch.zeros_like(lesion)
    rows[28:36, :] = True
    total = energy.sum()
    return ((energy[lesion].sum() / total).item(), (energy[rows & ~lesion].sum() / total).item(),
            (energy[~rows].sum() / total).item(), correction)


@pytest.mark.parametrize("spec", ["mri:accel=4,center=0.08,noise=0", "mri:accel=12,center=0.04,noise=0"])
def test_correction_stays_on_the_lesion_rows_for_every_gamma(spec):
    shares = {g: _shares(spec, g, 5) for g in (0.1, 1.0, 10.0, 100.0)}
    for gamma, (on_lesion, aliased, elsewhere, _) in shares.items():
        assert elsewhere < 1e-6, (gamma, elsewhere)  # nothing leaves the lesion's rows (column mask)
        assert aliased > 0.3, (gamma, aliased)  # a large part is aliased along the rows
        assert on_lesion + aliased == pytest.approx(1.0, abs=1e-5)
    lesion_shares = [s[0] for s in shares.values()]
    assert max(lesion_shares) - min(lesion_shares) < 0.04  # gamma over three decades moves it < 4 points
    magnitudes = [s[3].abs().max().item() for s in shares.values()]
    assert magnitudes == sorted(magnitudes) and magnitudes[-1] > 5 * magnitudes[0]  # gamma scales it


def test_more_cg_iterations_change_nothing_once_converged():
    # The system A^H A + I / gamma has at most three distinct eigenvalues (A^H A of the real-image
    # operator: 0, 1/2 and 1; 0 and 1 for these masks), so CG is exact after a few steps.
    *_, five = _shares("mri:accel=4,center=0.08,noise=0", 1.0, 5)
    *_, thirty = _shares("mri:accel=4,center=0.08,noise=0", 1.0, 30)
    assert torch.allclose(five, thirty, atol=1e-5)
    *_, one = _shares("mri:accel=4,center=0.08,noise=0", 1.0, 1)
    assert not torch.allclose(one, thirty, atol=1e-4)  # one step is not converged: the test can tell
