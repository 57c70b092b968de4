"""Baseline anomaly maps for one reconstructed slice, from its posterior sampling run.

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
dlsr               error of the prior's UNet features of x_mean after noising and   1 (+ the small
                   one-step reconstruction by a feature-space diffusion model       MLP, 3 times)
                   trained on ID features (:mod:`klip_med.eval.dlsr`; uses ID data)
diffguard          classifier-feature mismatch between x_mean and its re-generation ``steps`` (+ as
                   guided towards the anatomical level a noise-aware classifier      many classifier
                   predicts for it (:mod:`klip_med.eval.diffguard`; uses ID data;    backward passes)
                   image score: KL of the two level distributions)
monai_likelihood   MONAI ``get_likelihood``'s per-timestep KL terms of x_mean,      ``monai_timesteps``
                   averaged over evenly spaced timesteps (:mod:`~.prior_maps`)
brightness         the measurement-domain reconstruction (zero-filled / FBP)        0
brightness_dev     ``|baseline - median(baseline inside the body)|``                0
centrality         minus the distance of the block centre to the image centre       0
                   (block-level only, see :func:`centrality_blocks`)
================== ================================================================ ===============

The baselines of :data:`~klip_med.eval.names.POST_HOC` read only the posterior mean, rounded to
float16 as the benchmark's slice cache stores it, and each draws from its own generator (seeded from
one draw of the generator passed in): one added to a cached slice later equals the one computed with
the sampling run, bit for bit.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from klip_med.errors import KLIPMedError
from klip_med.eval.names import BASELINES, POST_HOC  # noqa: F401  (re-exported)
from klip_med.eval.prior_maps import (  # noqa: F401  (re-exported: their home before prior_maps)
    anoddpm_map,
    as_image,
    ddim_denoise,
    eigenscore,
    monai_likelihood_map,
)


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
        diffguard_t: normalised time the posterior mean is noised to before the guided re-generation.
        diffguard_steps: guided DDIM steps back to t = 0.
        diffguard_scale: classifier-guidance scale (0: the unguided prior).
        monai_timesteps: training timesteps of the MONAI likelihood terms, evenly spaced over [1, T - 1].
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
    diffguard_t: float = 0.4
    diffguard_steps: int = 10
    diffguard_scale: float = 2.0
    monai_timesteps: int = 25
    skip: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("anoddpm_t", "cfs_t", "diffguard_t"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise KLIPMedError(f"{name}: expected a normalised time in (0, 1), found {value}")
        for name in ("anoddpm_steps", "eigen_rank", "eigen_iterations", "cfs_train_slices", "diffguard_steps",
                     "monai_timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KLIPMedError(f"{name}: expected a positive integer, found {value!r}")
        if not self.eigen_levels or not all(0.0 < v < 1.0 for v in self.eigen_levels):
            raise KLIPMedError(f"eigen_levels: expected normalised times in (0, 1), found {self.eigen_levels}")
        if not 0.0 < self.eigen_fd < 1.0:
            raise KLIPMedError(f"eigen_fd: expected a fraction in (0, 1), found {self.eigen_fd}")
        if not self.diffguard_scale >= 0.0:
            raise KLIPMedError(f"diffguard_scale: expected a number >= 0, found {self.diffguard_scale}")
        unknown = sorted(set(self.skip) - set(BASELINES))
        if unknown:
            raise KLIPMedError(f"skip: expected names among {list(BASELINES)}, found {unknown}")

    def describe(self) -> dict:
        return {"anoddpm_t": self.anoddpm_t, "anoddpm_steps": self.anoddpm_steps,
                "eigen_levels": list(self.eigen_levels), "eigen_rank": self.eigen_rank,
                "eigen_iterations": self.eigen_iterations, "eigen_fd": self.eigen_fd,
                "cfs_train_slices": self.cfs_train_slices, "cfs_t": self.cfs_t, "diffguard_t": self.diffguard_t,
                "diffguard_steps": self.diffguard_steps, "diffguard_scale": self.diffguard_scale,
                "monai_timesteps": self.monai_timesteps, "skip": list(self.skip)}

    def settings_of(self, name: str) -> dict:
        """The settings one baseline's map depends on (its part of the eval cache's fingerprint)."""
        keys = {"anoddpm": ("anoddpm_t", "anoddpm_steps"),
                "eigenscore": ("eigen_levels", "eigen_rank", "eigen_iterations", "eigen_fd"),
                "cfs": ("cfs_train_slices", "cfs_t"), "dlsr": (),
                "diffguard": ("diffguard_t", "diffguard_steps", "diffguard_scale"),
                "monai_likelihood": ("monai_timesteps",)}.get(name, ())
        described = self.describe()
        return {k: described[k] for k in keys}


@dataclass
class MethodMap:
    """One method's output for one image.

    Attributes:
        pixel_map: (H, W) float32, higher = more anomalous; None for block-only / image-only methods.
        nfe: extra network forward passes on one image this method needed beyond the sampling run.
        seconds: wall time of that extra work.
        native_score: an image-level score the method defines itself (EigenScore, DiffGuard), else None.
        info: JSON-ready details (eigenvalues, timesteps, ...).
    """

    pixel_map: np.ndarray | None
    nfe: int = 0
    seconds: float = 0.0
    native_score: float | None = None
    info: dict = field(default_factory=dict)


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
    x = as_image(x_mean, "x_mean").to(y.device)
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


# ---------------------------------------------------------------- maps from the posterior mean alone


def as_cached(x_mean: Tensor) -> Tensor:
    """The posterior mean as the eval cache holds it: rounded to float16, back to float32."""
    return x_mean.detach().to(torch.float16).to(torch.float32)


def baseline_generator(base: int, name: str, device: torch.device) -> torch.Generator:
    """The generator of one post-hoc baseline, from the slice's base seed and the baseline's name."""
    return torch.Generator(device=device).manual_seed((int(base) + zlib.crc32(name.encode())) % (2**62))


def post_hoc_baselines(prior, x_mean: Tensor, generator: torch.Generator, settings: BaselineSettings,
                       names: Sequence[str], feature_density=None, dlsr=None, diffguard=None) -> dict[str, MethodMap]:
    """The baselines of :data:`POST_HOC` named in ``names`` for one reconstruction.

    Args:
        x_mean: (H, W) posterior mean in prior units (used as given: the runner passes the cached
            float16 copy, see :func:`as_cached`).
        generator: one draw of it seeds every baseline's own generator (:func:`baseline_generator`),
            so a baseline's numbers do not depend on which others are computed.
        feature_density, dlsr, diffguard: the fitted / trained models of ``cfs``, ``dlsr``
            (:class:`~klip_med.eval.dlsr.DLSR`) and ``diffguard`` (a level classifier).
    """
    unknown = [n for n in names if n not in POST_HOC]
    if unknown:
        raise KLIPMedError(f"names: expected post-hoc baselines among {list(POST_HOC)}, found {unknown}")
    needs = {"cfs": (feature_density, "a fitted FeatureDensity (klip_med.eval.features.fit_feature_density)"),
             "dlsr": (dlsr, "a trained DLSR model (klip-med train-baseline --kind dlsr)"),
             "diffguard": (diffguard, "a trained level classifier (klip-med train-baseline --kind diffguard)")}
    for name, (model, what) in needs.items():
        if name in names and model is None:
            arg = "feature_density" if name == "cfs" else name
            raise KLIPMedError(f"{arg}: expected {what} for the {name} baseline, found None (or skip '{name}')")
    device = generator.device
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    out: dict[str, MethodMap] = {}
    for name in [b for b in POST_HOC if b in names]:
        gen = baseline_generator(base, name, device)
        start = time.perf_counter()
        if name == "anoddpm":
            m, nfe, ts = anoddpm_map(prior, x_mean, gen, settings.anoddpm_t, settings.anoddpm_steps)
            out[name] = MethodMap(_np(m), nfe=nfe, info={"timesteps": ts})
        elif name == "eigenscore":
            m, score, nfe, info = eigenscore(prior, x_mean, gen, settings.eigen_levels, settings.eigen_rank,
                                             settings.eigen_iterations, settings.eigen_fd)
            out[name] = MethodMap(_np(m), nfe=nfe, native_score=score, info=info)
        elif name == "cfs":
            m = feature_density.score_map(prior, x_mean, gen)
            out[name] = MethodMap(_np(m), nfe=1, info={"fit_slices": feature_density.n_slices,
                                                       "fit_locations": feature_density.n_locations})
        elif name == "dlsr":
            m, info = dlsr.score_map(prior, x_mean, gen)
            out[name] = MethodMap(_np(m), nfe=1, info=info)
        elif name == "diffguard":
            from klip_med.eval.diffguard import diffguard_map

            m, nfe, info = diffguard_map(prior, diffguard, x_mean, gen, settings.diffguard_t, settings.diffguard_steps,
                                         settings.diffguard_scale)
            out[name] = MethodMap(_np(m), nfe=nfe, native_score=info["level_kl"], info=info)
        else:
            m, nfe, info = monai_likelihood_map(prior, x_mean, gen, settings.monai_timesteps)
            out[name] = MethodMap(_np(m), nfe=nfe, info=info)
        out[name].seconds = round(time.perf_counter() - start, 4)
    return out


# ---------------------------------------------------------------- all of them for one slice


def compute_baselines(prior, physics, y: Tensor, result, generator: torch.Generator,
                      settings: BaselineSettings | None = None, feature_density=None, *, dlsr=None,
                      diffguard=None) -> dict[str, MethodMap]:
    """Every baseline of :data:`BASELINES` (minus ``settings.skip``) for one reconstructed slice.

    Args:
        prior: the prior the run used (``eps``, ``alphas_cumprod``).
        physics, y: the operator and the measurement (1, *measurement).
        result: the :class:`klip_med.pipeline.SliceResult` of the run (baseline, recon_mean,
            recon_std, body_mask; all (H, W) on CPU).
        generator: seeds the post-hoc baselines' generators (on the prior's device; see
            :func:`post_hoc_baselines`).
        feature_density, dlsr, diffguard: the models of ``cfs``, ``dlsr`` and ``diffguard`` (each
            needed unless skipped).

    Returns:
        name -> :class:`MethodMap`, in table order; ``centrality`` has no pixel map (it is defined on blocks).
    """
    settings = settings or BaselineSettings()
    want = [b for b in BASELINES if b not in settings.skip]
    late = [b for b in want if b in POST_HOC]
    mean = as_cached(result.recon_mean)
    post = post_hoc_baselines(prior, mean, generator, settings, late, feature_density, dlsr, diffguard) if late else {}
    out: dict[str, MethodMap] = {}
    for name in want:
        start = time.perf_counter()
        if name in post:
            out[name] = post[name]
            continue
        if name == "posterior_std":
            out[name] = MethodMap(_np(result.recon_std), info={"samples": int(result.metadata["settings"]["samples"])})
        elif name == "residual":
            out[name] = MethodMap(_np(residual_map(physics, result.recon_mean, y)))
        elif name == "brightness":
            out[name] = MethodMap(_np(result.baseline))
        elif name == "brightness_dev":
            out[name] = MethodMap(_np(brightness_deviation_map(result.baseline, result.body_mask)))
        elif name == "centrality":
            out[name] = MethodMap(None)
        out[name].seconds = round(time.perf_counter() - start, 4)
    return out
