"""Baseline anomaly maps computed from the same posterior sampling run as KLIP.

Every baseline returns a per-pixel map (H, W) on the prior's grid where higher means "more
anomalous"; the runner pools it into blocks exactly like the KLIP map, so all methods are scored
on the same blocks and the same body mask. Images are in the prior's units ([-1, 1]).

================== ================================================================ ===============
name               map                                                              extra network
                                                                                    forwards
================== ================================================================ ===============
posterior_std      per-pixel std of the S posterior samples                         0 (same run)
residual           ``|A^H (A x_mean - y)|``: measurement residual of the posterior  0
                   mean mapped back to image space by the adjoint
anoddpm            ``|x_mean - D(x_t)|``: the posterior mean re-noised to           ``steps``
                   t = ``anoddpm_t`` * T, denoised by the prior with a short
                   deterministic DDIM run (1 step = Tweedie)
eigenscore         diagonal of the rank-k posterior covariance of the denoiser,     levels * (1 +
                   ``sum_j lambda_j v_j(i)^2 / sigma^2``, from forward-only         iterations *
                   subspace iteration with finite differences; averaged over a few  rank)
                   noise levels (image score: mean top eigenvalue / sigma^2)
cfs                squared Mahalanobis distance of the prior's UNet features of     1 (+ n_train
                   x_mean at a low noise level under a Gaussian fitted on ID         once per run)
                   training slices (:mod:`klip_med.eval.features`; uses ID data)
brightness         the measurement-domain reconstruction (zero-filled / FBP)        0
brightness_dev     ``|baseline - median(baseline inside the body)|``                0
centrality         minus the distance of the block centre to the image centre       0
                   (block-level only, see :func:`centrality_blocks`)
================== ================================================================ ===============
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.eval.names import BASELINES  # noqa: E402  (re-exported)
from klip_med.sampling.schedule import VPSchedule
from klip_med.score.windows import timestep_at


@dataclass(frozen=True)
class BaselineSettings:
    """Settings of the baselines that call the prior again.

    Attributes:
        anoddpm_t: normalised diffusion time t / (T - 1) the posterior mean is re-noised to, in (0, 1).
            0.25 (t = 250 of 1000) is AnoDDPM's choice.
        anoddpm_steps: deterministic DDIM steps from t back to 0 (1 = one Tweedie step).
        eigen_levels: normalised times t / (T - 1) of the noise levels EigenScore probes.
        eigen_rank: leading eigenpairs k per level.
        eigen_iterations: subspace iterations per level (the last one is a Rayleigh-Ritz step).
        eigen_fd: finite-difference step as a fraction of the noise level sigma (per-pixel RMS of
            the perturbation).
        cfs_train_slices: ID training slices the ``cfs`` feature density is fitted on.
        cfs_t: normalised time t / (T - 1) of the ``cfs`` feature snapshot (a low noise level).
        skip: baseline names not to compute (see :data:`BASELINES`).
    """

    anoddpm_t: float = 0.25
    anoddpm_steps: int = 5
    eigen_levels: tuple[float, ...] = (0.1, 0.25, 0.5)
    eigen_rank: int = 4
    eigen_iterations: int = 3
    eigen_fd: float = 0.01
    cfs_train_slices: int = 64
    cfs_t: float = 0.05
    skip: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0.0 < self.anoddpm_t < 1.0:
            raise KLIPMedError(f"anoddpm_t: expected a normalised time in (0, 1), found {self.anoddpm_t}")
        for name in ("anoddpm_steps", "eigen_rank", "eigen_iterations", "cfs_train_slices"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KLIPMedError(f"{name}: expected a positive integer, found {value!r}")
        if not self.eigen_levels or not all(0.0 < v < 1.0 for v in self.eigen_levels):
            raise KLIPMedError(f"eigen_levels: expected normalised times in (0, 1), found {self.eigen_levels}")
        if not 0.0 < self.cfs_t < 1.0:
            raise KLIPMedError(f"cfs_t: expected a normalised time in (0, 1), found {self.cfs_t}")
        if not 0.0 < self.eigen_fd < 1.0:
            raise KLIPMedError(f"eigen_fd: expected a fraction in (0, 1), found {self.eigen_fd}")
        unknown = sorted(set(self.skip) - set(BASELINES))
        if unknown:
            raise KLIPMedError(f"skip: expected names among {list(BASELINES)}, found {unknown}")

    def describe(self) -> dict:
        return {"anoddpm_t": self.anoddpm_t, "anoddpm_steps": self.anoddpm_steps,
                "eigen_levels": list(self.eigen_levels), "eigen_rank": self.eigen_rank,
                "eigen_iterations": self.eigen_iterations, "eigen_fd": self.eigen_fd,
                "cfs_train_slices": self.cfs_train_slices, "cfs_t": self.cfs_t, "skip": list(self.skip)}


@dataclass
class MethodMap:
    """One method's output for one image.

    Attributes:
        pixel_map: (H, W) float32, higher = more anomalous; None for block-only / image-only methods.
        nfe: extra network forward passes on one image this method needed beyond the sampling run.
        seconds: wall time of that extra work.
        native_score: an image-level score the method defines itself (EigenScore), else None.
        info: JSON-ready details (eigenvalues, timesteps, ...).
    """

    pixel_map: np.ndarray | None
    nfe: int = 0
    seconds: float = 0.0
    native_score: float | None = None
    info: dict = field(default_factory=dict)


def _image(x: Tensor, name: str) -> Tensor:
    """(H, W), (1, H, W) or (1, 1, H, W) -> (1, 1, H, W) float32."""
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 1:
        raise KLIPMedError(f"{name}: expected one single-channel image (H, W), found shape {tuple(x.shape)}")
    return x.to(torch.float32)


def _np(x: Tensor) -> np.ndarray:
    return x.detach().reshape(x.shape[-2:]).to("cpu", torch.float32).numpy()


# ---------------------------------------------------------------- maps from the sampling run itself


def residual_map(physics, x_mean: Tensor, y: Tensor) -> Tensor:
    """``|A^H (A x_mean - y)|``, (H, W): where the posterior mean disagrees with the data, in image space.

    Args:
        physics: the operator the measurement came from (``A``, ``A_adjoint``).
        x_mean: (H, W) posterior mean, prior units, on the physics' device.
        y: (1, *measurement) the measurement.
    """
    x = _image(x_mean, "x_mean").to(y.device)
    with torch.no_grad():
        back = physics.A_adjoint(physics.A(x) - y)
    return back.abs().reshape(x.shape[-2:])


def brightness_deviation_map(baseline: Tensor, body_mask: Tensor) -> Tensor:
    """``|baseline - median(baseline[body])|``, (H, W) (the whole image's median if the mask is empty)."""
    b = baseline.reshape(baseline.shape[-2:]).to(torch.float32)
    m = body_mask.reshape(b.shape).to(torch.bool)
    ref = b[m].median() if bool(m.any()) else b.median()
    return (b - ref).abs()


def centrality_blocks(shape: Sequence[int], block_size: int) -> np.ndarray:
    """Minus the distance (pixels) of each block's centre to the image centre, (gh, gw).

    Blocks tile from the top-left corner; a partial edge block's centre is the centre of its
    pixels. The image centre is ((H - 1) / 2, (W - 1) / 2).
    """
    h, w = (int(v) for v in shape[-2:])
    if not isinstance(block_size, int) or not 1 <= block_size <= min(h, w):
        raise KLIPMedError(f"block_size: expected an integer in [1, {min(h, w)}], found {block_size!r}")

    def centres(n: int) -> np.ndarray:
        starts = np.arange(0, n, block_size)
        ends = np.minimum(starts + block_size, n) - 1
        return (starts + ends) / 2.0

    rows, cols = np.meshgrid(centres(h) - (h - 1) / 2, centres(w) - (w - 1) / 2, indexing="ij")
    return -np.sqrt(rows**2 + cols**2)


# ---------------------------------------------------------------- maps that call the prior again


def _timestep(frac: float, schedule: VPSchedule) -> int:
    return int(round(timestep_at(frac, schedule.num_train_timesteps)))


def _eps(prior, x: Tensor, t: int) -> Tensor:
    with torch.no_grad():
        return prior.eps(x, torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device))


def ddim_denoise(prior, x_t: Tensor, t_start: int, steps: int,
                 clip: tuple[float, float] | None = (-1.0, 1.0)) -> tuple[Tensor, list[int]]:
    """Deterministic DDIM (eta = 0) from training timestep ``t_start`` to the clean end.

    Args:
        x_t: (B, C, H, W) noisy images at ``t_start``.
        steps: network calls (timesteps evenly spaced from ``t_start`` to 0; 1 = Tweedie's estimate).
        clip: range the denoised estimate is clipped to at every step (None: no clipping).

    Returns:
        the final denoised estimate (B, C, H, W) and the timesteps used.
    """
    schedule = VPSchedule(prior.alphas_cumprod)
    ts = sorted({int(round(v)) for v in np.linspace(t_start, 0, max(steps, 1))}, reverse=True)
    x = x_t
    x0 = x_t
    for k, t in enumerate(ts):
        a = schedule.alpha_bar(t)
        eps = _eps(prior, x, t)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip is not None:
            x0 = x0.clamp(*clip)
        if k + 1 < len(ts):
            a_next = schedule.alpha_bar(ts[k + 1])
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return x0, ts


def anoddpm_map(prior, x_mean: Tensor, generator: torch.Generator, t_frac: float = 0.25,
                steps: int = 5) -> tuple[Tensor, int, list[int]]:
    """AnoDDPM-style reconstruction error of the posterior mean, (H, W).

    ``x_t = sqrt(a_t) x_mean + sqrt(1 - a_t) z`` at ``t = round(t_frac (T - 1))``, denoised by the
    prior alone (:func:`ddim_denoise`), error ``|x_mean - x_hat|``. Gaussian noise, one draw.

    Returns:
        (map, network forwards, timesteps used).
    """
    schedule = VPSchedule(prior.alphas_cumprod)
    t = _timestep(t_frac, schedule)
    x = _image(x_mean, "x_mean").to(_device(prior))
    a = schedule.alpha_bar(t)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    x_hat, ts = ddim_denoise(prior, math.sqrt(a) * x + math.sqrt(1 - a) * z, t, steps)
    return (x - x_hat).abs().reshape(x.shape[-2:]), len(ts), ts


def eigenscore(prior, x_mean: Tensor, generator: torch.Generator, levels: Sequence[float] = (0.1, 0.25, 0.5),
               rank: int = 4, iterations: int = 3, fd: float = 0.01) -> tuple[Tensor, float, int, dict]:
    """Leading eigenpairs of the denoiser's posterior covariance around the posterior mean.

    In the variance-exploding view ``u = x_t / sqrt(a_t) = x0 + sigma z``, Tweedie gives
    ``Cov[x0 | u] = sigma^2 dD/du`` with ``D(u)`` the denoised estimate. Its leading eigenpairs
    come from subspace iteration on products ``Cov v ~ sigma^2 (D(u + h v) - D(u)) / h``
    (forward passes only; ``h`` makes the perturbation's per-pixel RMS ``fd * sigma``), the last
    iteration a Rayleigh-Ritz step on the symmetrised projected matrix. Eigenvalues are reported
    relative to ``sigma^2`` (in [0, 1] for an exact denoiser, comparable across levels).

    Args:
        x_mean: (H, W) the reconstruction, prior units.
        levels: normalised times t / (T - 1) of the noise levels.
        rank, iterations, fd: see :class:`BaselineSettings`.

    Returns:
        ``(map, score, nfe, info)``: map (H, W) = mean over levels of
        ``sum_j max(lambda_j, 0) / sigma^2 * v_j(i)^2``; score = mean over levels of the top
        ``lambda_1 / sigma^2``; nfe = forward passes on one image; info = eigenvalues per level.
    """
    schedule = VPSchedule(prior.alphas_cumprod)
    x = _image(x_mean, "x_mean").to(_device(prior))
    shape = x.shape[1:]
    n = x.numel()
    if rank > n:
        raise KLIPMedError(f"eigen_rank: expected at most the number of pixels {n}, found {rank}")
    total = torch.zeros(shape[-2:], dtype=torch.float32, device=x.device)
    tops, per_level, nfe = [], [], 0
    for frac in levels:
        t = _timestep(frac, schedule)
        a = schedule.alpha_bar(t)
        sigma = math.sqrt((1 - a) / a)
        u = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)

        def denoise(batch: Tensor, t=t, a=a, sigma=sigma) -> Tensor:
            return batch - sigma * _eps(prior, math.sqrt(a) * batch, t)

        d0 = denoise(u)
        nfe += 1
        start = torch.randn((n, rank), generator=generator, device=x.device, dtype=torch.float32)
        v = torch.linalg.qr(start).Q
        h = fd * sigma * math.sqrt(n)
        evals = torch.zeros(rank, device=x.device)
        for it in range(iterations):
            probes = u + h * v.T.reshape(rank, *shape)
            cov_v = (sigma**2) * ((denoise(probes) - d0) / h).reshape(rank, n).T  # (n, rank)
            nfe += rank
            if it + 1 < iterations:
                v = torch.linalg.qr(cov_v).Q
                continue
            small = v.T @ cov_v
            evals, rot = torch.linalg.eigh(0.5 * (small + small.T))
            order = torch.argsort(evals, descending=True)
            evals, v = evals[order], v @ rot[:, order]
        rel = (evals / sigma**2).clamp_min(0.0)
        total += (v.square() * rel).sum(dim=1).reshape(shape[-2:])
        tops.append(float(rel[0]))
        per_level.append({"t": t, "sigma": round(sigma, 5), "eigenvalues_over_sigma2": [float(e) for e in evals / sigma**2]})
    return total / len(levels), float(np.mean(tops)), nfe, {"levels": per_level}


def _device(prior) -> torch.device:
    dev = getattr(prior, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return prior.alphas_cumprod.device if isinstance(prior.alphas_cumprod, Tensor) else torch.device("cpu")


# ---------------------------------------------------------------- all of them for one slice


def compute_baselines(prior, physics, y: Tensor, result, generator: torch.Generator,
                      settings: BaselineSettings | None = None, feature_density=None) -> dict[str, MethodMap]:
    """Every baseline of :data:`BASELINES` (minus ``settings.skip``) for one reconstructed slice.

    Args:
        prior: the prior the run used (``eps``, ``alphas_cumprod``).
        physics, y: the operator and the measurement (1, *measurement).
        result: the :class:`klip_med.pipeline.SliceResult` of the run (baseline, recon_mean,
            recon_std, body_mask; all (H, W) on CPU).
        generator: randomness of AnoDDPM's re-noising, EigenScore's probes and the cfs snapshot
            (on the prior's device).
        feature_density: the fitted :class:`~klip_med.eval.features.FeatureDensity` (needed
            unless ``cfs`` is skipped).

    Returns:
        name -> :class:`MethodMap`; ``centrality`` has no pixel map (it is defined on blocks).
    """
    settings = settings or BaselineSettings()
    out: dict[str, MethodMap] = {}
    want = [b for b in BASELINES if b not in settings.skip]
    if "cfs" in want and feature_density is None:
        raise KLIPMedError("feature_density: expected a fitted FeatureDensity for the cfs baseline, found None "
                           "(fit one with klip_med.eval.features.fit_feature_density, or skip 'cfs')")
    for name in want:
        start = time.perf_counter()
        if name == "posterior_std":
            out[name] = MethodMap(_np(result.recon_std), info={"samples": int(result.metadata["settings"]["samples"])})
        elif name == "residual":
            out[name] = MethodMap(_np(residual_map(physics, result.recon_mean, y)))
        elif name == "anoddpm":
            m, nfe, ts = anoddpm_map(prior, result.recon_mean, generator, settings.anoddpm_t, settings.anoddpm_steps)
            out[name] = MethodMap(_np(m), nfe=nfe, info={"timesteps": ts})
        elif name == "eigenscore":
            m, score, nfe, info = eigenscore(prior, result.recon_mean, generator, settings.eigen_levels,
                                             settings.eigen_rank, settings.eigen_iterations, settings.eigen_fd)
            out[name] = MethodMap(_np(m), nfe=nfe, native_score=score, info=info)
        elif name == "cfs":
            m = feature_density.score_map(prior, result.recon_mean, generator)
            out[name] = MethodMap(_np(m), nfe=1, info={"fit_slices": feature_density.n_slices,
                                                       "fit_locations": feature_density.n_locations})
        elif name == "brightness":
            out[name] = MethodMap(_np(result.baseline))
        elif name == "brightness_dev":
            out[name] = MethodMap(_np(brightness_deviation_map(result.baseline, result.body_mask)))
        elif name == "centrality":
            out[name] = MethodMap(None)
        out[name].seconds = round(time.perf_counter() - start, 4)
    return out
