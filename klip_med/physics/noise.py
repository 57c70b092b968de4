"""Measurement noise models: thin factories over ``deepinv.physics`` noise classes.

All noise acts in the measurement domain (sinogram line integrals for CT, k-space for MRI).
Randomness comes only from an explicit :class:`torch.Generator` (``rng``) when one is given,
never from a seed set on torch's global generator.
"""

from __future__ import annotations

import torch
from deepinv.physics import GaussianNoise, LogPoissonNoise, NoiseModel, ZeroNoise

from klip_med.physics.validate import check_float, check_noise_sigma


class ClampedLogPoissonNoise(LogPoissonNoise):
    r"""deepinv's :class:`~deepinv.physics.LogPoissonNoise` with photon starvation handled.

    ``y = -log(N / i0) / mu`` with ``N ~ Poisson(i0 * exp(-mu * z))`` where ``z`` is the clean
    line integral. deepinv returns ``+inf`` when a detector bin counts zero photons (likely at low
    ``i0`` or behind dense material); here such bins are given ``min_count`` photons instead
    (0.1, the convention of the LoDoPaB-CT data set deepinv's docstring cites), so
    ``y <= -log(min_count / i0) / mu`` stays finite.

    Args:
        i0: mean photon count per detector bin of the unattenuated beam (> 0).
        mu: attenuation per unit of line integral (see :func:`klip_med.physics.low_dose_ct`).
        min_count: photon count substituted for zero counts (> 0).
        rng: optional generator for the Poisson draws.
    """

    def __init__(
        self,
        i0: float,
        mu: float,
        min_count: float = 0.1,
        rng: torch.Generator | None = None,
    ) -> None:
        super().__init__(N0=i0, mu=mu, rng=rng)
        self.min_count = float(min_count)

    def forward(self, x: torch.Tensor, mu=None, N0=None, seed: int | None = None, **kwargs) -> torch.Tensor:
        y = super().forward(x, mu=mu, N0=N0, seed=seed, **kwargs)
        cap = -torch.log(self.min_count / self.N0) / self.mu
        return torch.where(torch.isposinf(y), cap.to(y.dtype).expand_as(y), y)


class SequentialNoise(NoiseModel):
    """Apply several noise models in order: ``y = N_k(...N_2(N_1(z)))``.

    deepinv's ``NoiseModel.__mul__`` composes the models' ``noise_model`` attributes, which for
    :class:`~deepinv.physics.GaussianNoise` is the identity (its noise lives in ``forward``), so
    ``GaussianNoise(s) * other`` silently drops the Gaussian part. This class calls each model's
    ``forward`` instead.
    """

    def __init__(self, *stages: NoiseModel) -> None:
        super().__init__(rng=None)
        self.stages = torch.nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, seed: int | None = None, **kwargs) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x, seed=seed, **kwargs)
        return x


def gaussian_noise(noise_sigma: float, generator: torch.Generator | None = None) -> NoiseModel:
    """Additive white Gaussian noise of standard deviation ``noise_sigma`` (measurement units).

    Returns deepinv's ``ZeroNoise`` when ``noise_sigma == 0`` (no random draws), otherwise
    ``GaussianNoise(sigma=noise_sigma, rng=generator)``.
    """
    sigma = check_noise_sigma(noise_sigma)
    if sigma == 0.0:
        return ZeroNoise()
    return GaussianNoise(sigma=sigma, rng=generator)


def log_poisson_noise(
    i0: float,
    mu: float,
    noise_sigma: float = 0.0,
    generator: torch.Generator | None = None,
) -> NoiseModel:
    """Photon-counting CT noise, optionally followed by Gaussian noise on the log data.

    Args:
        i0: unattenuated photons per detector bin (> 0).
        mu: attenuation per unit of line integral (> 0).
        noise_sigma: extra Gaussian noise added after the log transform (>= 0), in line-integral units.
        generator: optional generator shared by both stages (drawn in order: Poisson, then Gaussian).
    """
    i0 = check_float("i0", i0, low=0.0, low_open=True)
    mu = check_float("mu", mu, low=0.0, low_open=True)
    photon = ClampedLogPoissonNoise(i0=i0, mu=mu, rng=generator)
    if check_noise_sigma(noise_sigma) == 0.0:
        return photon
    return SequentialNoise(photon, GaussianNoise(sigma=noise_sigma, rng=generator))


def _number(t: torch.Tensor | float) -> float | list[float]:
    if isinstance(t, torch.Tensor):
        return t.item() if t.numel() == 1 else t.detach().cpu().flatten().tolist()
    return float(t)


def describe_noise(model: NoiseModel) -> dict:
    """JSON-ready description of a noise model (``{"model": ..., parameters...}``)."""
    if isinstance(model, ZeroNoise):
        return {"model": "none"}
    if isinstance(model, GaussianNoise):
        return {"model": "gaussian", "sigma": _number(model.sigma), "seeded": model.rng is not None}
    if isinstance(model, LogPoissonNoise):
        out = {
            "model": "log-poisson",
            "i0": _number(model.N0),
            "mu": _number(model.mu),
            "seeded": model.rng is not None,
        }
        if isinstance(model, ClampedLogPoissonNoise):
            out["min_count"] = model.min_count
        return out
    if isinstance(model, SequentialNoise):
        return {"model": "sequential", "stages": [describe_noise(s) for s in model.stages]}
    return {"model": type(model).__name__}
