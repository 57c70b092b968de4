"""The variance-preserving (VP) noise schedule of an epsilon-prediction prior.

``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``, t = 0 .. T-1 (training timesteps).
The canonical noise level of ``x_t`` is ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``:
the noise standard deviation of ``x_t / sqrt(alpha_bar_t)``, in image intensity units.
"""

from __future__ import annotations

import torch
from torch import Tensor

from klip_med.errors import KLIPMedError


class VPSchedule:
    """A discrete VP schedule with helpers for respaced sampling.

    Args:
        alphas_cumprod: ``alpha_bar_t`` for t = 0 .. T-1, shape (T,), strictly decreasing in (0, 1).
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        a = torch.as_tensor(alphas_cumprod).detach().to(torch.float64).cpu()
        if a.ndim != 1 or a.numel() < 2:
            raise KLIPMedError(
                f"alphas_cumprod: expected a 1-D tensor of >= 2 values, found shape {tuple(a.shape)}"
            )
        if not bool(((a > 0) & (a < 1)).all()) or not bool((a[1:] < a[:-1]).all()):
            raise KLIPMedError(
                "alphas_cumprod: expected strictly decreasing values in (0, 1), found "
                f"min {float(a.min()):.3g}, max {float(a.max()):.3g}"
            )
        self.alphas_cumprod = a
        prev = torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
        self.betas = 1.0 - a / prev
        self.sigmas = ((1.0 - a) / a).sqrt()
        self._log_sigmas: dict[torch.device, Tensor] = {}

    def _log_sigmas_on(self, device: torch.device) -> Tensor:
        """``log sigma_t`` on ``device``, copied there once (a per-call host-to-device copy would sync)."""
        if device not in self._log_sigmas:
            self._log_sigmas[device] = self.sigmas.log().to(device)
        return self._log_sigmas[device]

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return int(self.alphas_cumprod.numel())

    def respaced_timesteps(self, n_steps: int) -> list[int]:
        """``n_steps`` training timesteps in sampling order (T-1 first, 0 last), evenly spread."""
        T = self.num_train_timesteps
        if not isinstance(n_steps, int) or not 1 <= n_steps <= T:
            raise KLIPMedError(
                f"n_steps: expected an integer in [1, {T}] (the prior's training timesteps), "
                f"found {n_steps!r}"
            )
        if n_steps == 1:
            return [T - 1]
        ts = torch.linspace(T - 1, 0, n_steps, dtype=torch.float64).round().long().tolist()
        return [int(t) for t in ts]

    def alpha_bar(self, t: int) -> float:
        """``alpha_bar_t``; 1.0 for t = -1 (the clean end after the last step)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def sigma(self, t: int) -> float:
        """Canonical noise level of training timestep ``t``."""
        return float(self.sigmas[t])

    def continuous_timestep(self, sigma: Tensor) -> Tensor:
        """Fractional training timestep whose canonical noise level is ``sigma``.

        Linear interpolation of ``log sigma`` between integer timesteps, clamped to [0, T-1].

        Args:
            sigma: any shape, > 0.
        """
        log_s = self._log_sigmas_on(sigma.device)
        flat = sigma.detach().to(torch.float64).clamp_min(1e-12).log().reshape(-1)
        idx = torch.searchsorted(log_s, flat).clamp(1, log_s.numel() - 1)
        lo, hi = log_s[idx - 1], log_s[idx]
        frac = ((flat - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (idx - 1 + frac).reshape(sigma.shape).to(torch.float32)

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """``alpha_bar`` at fractional timesteps ``t`` (log-sigma interpolation), float64."""
        log_s = self._log_sigmas_on(t.device)
        t = t.detach().to(torch.float64).clamp(0, log_s.numel() - 1)
        lo = t.floor().long().clamp(max=log_s.numel() - 2)
        w = t - lo
        sigma = ((1 - w) * log_s[lo] + w * log_s[lo + 1]).exp()
        return 1.0 / (1.0 + sigma**2)


def linear_beta_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """``alpha_bar`` of the linear-beta DDPM schedule (Ho et al. 2020), shape (T,), float64."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)
