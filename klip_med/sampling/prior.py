"""What a sampler needs from a diffusion prior."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class EpsilonPrior(Protocol):
    """An epsilon-prediction variance-preserving diffusion prior.

    Attributes:
        alphas_cumprod: the training schedule ``alpha_bar_t``, shape (T,).

    ``eps(x_t, t)`` predicts the noise in ``x_t`` (B, C, H, W) at training timesteps ``t``
    (B,) float (fractional values allowed: the network's time embedding interpolates). Images
    are in the prior's intensity range.
    """

    alphas_cumprod: Tensor

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor: ...
