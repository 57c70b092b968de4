"""The sync-free proximal CG gives deepinv's least_squares(CG, tol=0) numbers exactly."""

from __future__ import annotations

import pytest
import torch
from deepinv.optim.linear import least_squares

from klip_med.physics import parse_physics
from klip_med.sampling.cg import proximal_cg


@pytest.mark.parametrize("spec", ["mri:accel=4,center=0.08,noise=0.01", "ct-sparse:views=12"])
@pytest.mark.parametrize("gamma", [1.0, 0.3])
@pytest.mark.parametrize("n_iter", [1, 5, 102])
def test_proximal_cg_matches_deepinv_bit_for_bit(spec, gamma, n_iter, rng):
    physics = parse_physics(spec, 16, generator=rng)
    y = physics(torch.randn(2, 1, 16, 16, generator=rng))
    z = torch.randn(2, 1, 16, 16, generator=rng)
    ours = proximal_cg(physics.A, physics.A_adjoint, y, z, gamma, n_iter)
    theirs = least_squares(physics.A, physics.A_adjoint, y, z=z, init=z, gamma=gamma, solver="CG",
                           max_iter=n_iter, tol=0.0)
    assert torch.equal(ours, theirs)
