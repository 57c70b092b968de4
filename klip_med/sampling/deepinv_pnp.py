"""KLIP on deepinv's ``DiffPIR`` and ``DDRM``: one StepEvent per step, nothing forked.

Both run their whole loop inside ``forward`` with no per-step hook and draw noise from torch's
*global* generator. The adapters subclass them and see each step through the two things the loop
calls: the denoiser (wrapped: its input reveals the iterate, its output the denoised estimate) and,
for DiffPIR, the data fidelity's ``prox``. The posterior step is deepinv's own; the prior step (what
the same loop does without the data step, with the same noise draw) is written out next to each
class from deepinv's update, and the replay tests check it against deepinv itself.

Randomness: the global generator is forked for the call (``torch.random.fork_rng``: the caller's
global state is restored afterwards) and seeded from the ``generator`` argument, so the same
generator state gives the same samples; deepinv's own ``seed`` argument (which seeds the global
generator for good) is refused.

DiffPIR (Zhu et al. 2023, deepinv's form). With ``x0`` the prior's denoised estimate and ``x0p`` its
proximal data step, ``x_next = sqrt(a') x0p + sqrt(1 - a') (sqrt(1 - zeta) eps(x0p) + sqrt(zeta) z)``
with ``eps(v) = (x - sqrt(a) v) / sqrt(1 - a)``. The prior step uses ``x0``, so the noise cancels::

    d_k = (sqrt(a') - sqrt(1 - a') sqrt(1 - zeta) sqrt(a) / sqrt(1 - a)) (x0p - x0),  s_k = sqrt(1 - a') sqrt(zeta)

in DiffPIR's state units (the [-1, 1] image range, VP scaling).

DDRM (Kawar et al. 2022, deepinv's form, which needs a ``DecomposablePhysics``) works on the
spectral coefficients ``x_bar = V^T x``. The prior step is DDRM's update of an unobserved
coefficient, ``x_bar0 + c sigma' (x_bar - x_bar0) / sigma + eta sigma' z / sqrt(2)`` with
``c = sqrt(1 - eta^2)`` and ``x_bar0`` the denoised estimate's coefficients; the draw ``z`` is
replayed from the seed the global generator got. ``d_k = V (x_bar_post - x_bar_prior)``,
``s_k = eta sigma' / sqrt(2)``. DDRM's observed coefficients with ``sigma' >= nsr`` also change the
noise level (``sqrt(sigma'^2 - (nsr etab)^2)`` instead of ``eta sigma'``), so there the two step
kernels differ in covariance too and the same-draw ``d_k^2 / (2 s_k^2)`` is not their exact KL.
Note that deepinv's DDRM tells its denoiser ``sigma`` but injects noise of std ``sigma / sqrt(2)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from deepinv.models import Denoiser
from deepinv.optim.data_fidelity import L2
from deepinv.sampling import DDRM, DiffPIR
from torch import Tensor, nn

from klip_med.errors import expect
from klip_med.sampling.deepinv_adapter import EpsilonDenoiser
from klip_med.sampling.prior import EpsilonPrior
from klip_med.score.events import StepEvent, StepObserver


@contextmanager
def seeded_global_rng(generator: torch.Generator | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block that draws from torch's global generator of ``device`` (what DiffPIR / DDRM use),
    seeded from ``generator``; that global state is restored on exit and no other device's is touched.
    ``None`` leaves the global generator as it is."""
    if generator is None:
        yield
        return
    expect(isinstance(generator, torch.Generator), "generator", "a torch.Generator or None",
           type(generator).__name__)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: it also (lazily) seeds CUDA
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


class UnitRangeDenoiser(Denoiser):
    """Our [-1, 1] prior as a deepinv denoiser of [0, 1] images (deepinv's convention for DiffPIR / DDRM):
    ``D01(u, s) = (D(2u - 1, 2s) + 1) / 2`` with ``D`` the prior's own denoiser (:class:`EpsilonDenoiser`)."""

    def __init__(self, prior: EpsilonPrior) -> None:
        super().__init__()
        self.inner = EpsilonDenoiser(prior, keep_calls=False)

    def forward(self, x: Tensor, sigma: Tensor | float, *args, **kwargs) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        return (self.inner(2 * x - 1, 2 * sigma) + 1) / 2


class _Tap(nn.Module):
    """Calls ``on_call(input, output)`` after each call of the wrapped denoiser."""

    def __init__(self, denoiser: nn.Module, on_call) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.on_call = on_call

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        out = self.denoiser(x, sigma, *args, **kwargs)
        self.on_call(x, out)
        return out


class _ProxTap:
    """A data fidelity whose ``prox`` is the wrapped one's, reported to ``on_prox(input, output)``."""

    def __init__(self, fidelity, on_prox) -> None:
        self.fidelity = fidelity
        self.on_prox = on_prox

    def prox(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.fidelity.prox(x, *args, **kwargs)
        self.on_prox(x, out)
        return out


def _emit(observers: Sequence[StepObserver], event: StepEvent) -> None:
    for observe in observers:
        observe(event)


class ObservedDiffPIR(DiffPIR):
    """deepinv's ``DiffPIR``, emitting one StepEvent per sampling step (``max_iter - 1`` of them, one fewer
    when DiffPIR's grid repeats its last noise level, as it does for ``max_iter`` near 1000).

    Args:
        model: the denoiser of [0, 1] images (``D(x, sigma)``), as for ``DiffPIR``
            (:class:`UnitRangeDenoiser` for a klip_med prior).
        data_fidelity: as for ``DiffPIR`` (``deepinv.optim.L2()``; ``ZeroFidelity()`` gives the prior sampler).
        observers: called once per step.
        sigma, max_iter, zeta, lambda_, device: as for ``DiffPIR``.

    Call ``model(y, physics, x_init=None, generator=g)`` with ``y`` a measurement of the [0, 1] image.
    Events are in DiffPIR's state units (the [-1, 1] range); ``sigma`` is the step's canonical VP noise
    level, ``g = sqrt(beta_t)`` and ``dt`` the training timesteps the step spans.
    """

    def __init__(self, model: nn.Module, data_fidelity=None, observers: Sequence[StepObserver] = (), *,
                 sigma: float = 0.05, max_iter: int = 100, zeta: float = 0.1, lambda_: float = 7.0,
                 device: str | torch.device = "cpu") -> None:
        expect(isinstance(max_iter, int) and max_iter >= 2, "max_iter", "an integer >= 2", max_iter)
        expect(0.0 <= zeta <= 1.0, "zeta", "a noise fraction in [0, 1]", zeta)
        data_fidelity = L2() if data_fidelity is None else data_fidelity
        super().__init__(_Tap(model, self._on_denoise), _ProxTap(data_fidelity, self._on_prox), sigma=sigma,
                         max_iter=max_iter, zeta=zeta, lambda_=lambda_, verbose=False, device=device)
        self.observers = tuple(observers)
        self.recip_sqrt_alpha_bar = self.get_alpha_prod()[0]  # the table DiffPIR scales its model input with
        self._reset()

    def _reset(self) -> None:
        self.iteration, self.index = 0, 0
        self.x0: Tensor | None = None
        self.pending: tuple | None = None

    def _times(self, i: int) -> tuple[int, int | None]:
        """Training timesteps of iteration ``i``'s input and of the next iteration (as DiffPIR finds them)."""
        t = int(self.find_nearest(self.reduced_alpha_cumprod, self.sigmas[self.seq[i]]))
        nxt = None if i + 1 >= len(self.seq) else int(
            self.find_nearest(self.reduced_alpha_cumprod, self.sigmas[self.seq[i + 1]]))
        return t, nxt

    def _on_denoise(self, x_aux: Tensor, out: Tensor) -> None:
        t, _ = self._times(self.iteration)
        at = 1 / self.recip_sqrt_alpha_bar[t] ** 2
        if self.pending is not None:  # DiffPIR hands the model x / (2 sqrt(a)) + 0.5: the previous step's output
            self._finish_step((x_aux - 0.5) * (2 * at.sqrt()))
        self.x0 = (2 * out - 1).clamp(-1, 1)
        self.iteration += 1

    def _on_prox(self, x_in: Tensor, x_out: Tensor) -> None:
        t, nxt = self._times(self.iteration - 1)
        a, a_next = self.sqrt_alphas_cumprod, self.sqrt_1m_alphas_cumprod
        coef = a[nxt] - a_next[nxt] * math.sqrt(1 - self.zeta) * a[t] / a_next[t]
        self.pending = (t, nxt, coef * 2 * (x_out - x_in), a_next[nxt] * math.sqrt(self.zeta))

    def _finish_step(self, x_post: Tensor) -> None:
        t, nxt, delta, noise_std = self.pending
        self.pending = None
        _emit(self.observers, StepEvent(
            index=self.index, sigma=float(self.reduced_alpha_cumprod[t]),
            noise_std=noise_std.detach().to(torch.float32), delta=delta.detach().to(torch.float32),
            x=x_post.detach().to(torch.float32), x0_hat=self.x0.detach().to(torch.float32),
            # DiffPIR repeats a noise level near the end when max_iter is large: such a step has no
            # SDE length (its KL is the transition KL, zeta > 0; with zeta = 0 its d_k is 0)
            g=None if nxt == t else float(self.betas[t].sqrt()), dt=None if nxt == t else float(t - nxt)))
        self.index += 1

    def forward(self, y: Tensor, physics, seed=None, x_init: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        expect(seed is None, "seed", "None (pass generator=: deepinv's seed re-seeds torch's global generator)",
               seed)
        self._reset()
        with seeded_global_rng(generator, y.device):
            out = super().forward(y, physics, x_init=x_init)
        return out


class ObservedDDRM(DDRM):
    """deepinv's ``DDRM``, emitting one StepEvent per sampling step (``len(sigmas) - 1`` of them).

    Args:
        denoiser: the denoiser of [0, 1] images, as for ``DDRM`` (:class:`UnitRangeDenoiser` for a
            klip_med prior).
        observers: called once per step.
        sigmas, eta, etab, eps: as for ``DDRM``.
        sigma_scale: factor from the state's units to the prior's for the events' ``sigma`` (2 for a
            [0, 1] denoiser of a [-1, 1] prior); ``sigma`` is the injected std ``sigmas[k] / sqrt(2)``
            times this factor.

    Call ``model(y, physics, generator=g)`` with a ``deepinv.physics.DecomposablePhysics``. Events are
    in the image domain (``delta = V d_bar``, ``x`` the iterate ``V x_bar``), in the state's units.
    DDRM's chain is variance exploding: ``g = sqrt((sigma_k^2 - sigma_{k+1}^2) / 2)``, ``dt = 1`` (the
    variance the step's VE SDE removes, for the SDE normalisation of its deterministic last step).
    """

    def __init__(self, denoiser: nn.Module, observers: Sequence[StepObserver] = (), *,
                 sigmas: Sequence[float] | None = None, eta: float = 0.85, etab: float = 1.0,
                 eps: float = 1e-6, sigma_scale: float = 1.0) -> None:
        sigmas = np.linspace(1, 0, 100) if sigmas is None else np.asarray(sigmas, dtype=np.float64)
        expect(sigmas.ndim == 1 and sigmas.size >= 2 and bool(np.all(np.diff(sigmas) < 0)), "sigmas",
               "at least 2 strictly decreasing noise levels", sigmas.tolist()[:6])
        expect(0.0 < eta <= 1.0, "eta", "a value in (0, 1] (eta = 0 makes every step deterministic)", eta)
        super().__init__(_Tap(denoiser, self._on_denoise), sigmas=sigmas, eta=eta, etab=etab, verbose=False,
                         eps=eps)
        self.observers = tuple(observers)
        self.sigma_scale = float(sigma_scale)
        self.physics = None

    def _on_denoise(self, u: Tensor, out: Tensor) -> None:
        x_bar = self.physics.V_adjoint(u)
        k = self.iteration
        if k >= 1:
            s_prev, s_now = float(self.sigmas[k - 1]), float(self.sigmas[k])
            den_bar = self.denoised_bar
            z = torch.randn(den_bar.shape, dtype=den_bar.dtype, device=den_bar.device, generator=self.shadow)
            c = math.sqrt(1 - self.eta**2)
            prior_bar = den_bar + c * s_now * (self.state_bar - den_bar) / s_prev + self.eta * s_now * z / math.sqrt(2)
            std = torch.full((u.shape[0],), self.eta * s_now / math.sqrt(2), dtype=torch.float32, device=u.device)
            _emit(self.observers, StepEvent(
                index=k - 1, sigma=s_prev / math.sqrt(2) * self.sigma_scale, noise_std=std,
                delta=self.physics.V(x_bar - prior_bar).detach().to(torch.float32),
                x=u.detach().to(torch.float32), x0_hat=self.denoised.detach().to(torch.float32),
                g=math.sqrt((s_prev**2 - s_now**2) / 2), dt=1.0))
        self.state_bar, self.denoised, self.denoised_bar = x_bar, out, self.physics.V_adjoint(out)
        self.iteration += 1

    def forward(self, y: Tensor, physics, seed=None, generator: torch.Generator | None = None) -> Tensor:
        expect(seed is None, "seed", "None (pass generator=: deepinv's seed re-seeds torch's global generator)",
               seed)
        expect(hasattr(physics, "V_adjoint") and hasattr(physics, "mask"), "physics",
               "a deepinv.physics.DecomposablePhysics (DDRM needs its SVD)", type(physics).__name__)
        self.physics, self.iteration = physics, 0
        with seeded_global_rng(generator, y.device):
            # the global generator's twin: it replays DDRM's draws, in order, to give the prior step its z
            self.shadow = torch.Generator(device=y.device)
            if y.device.type == "cpu":
                self.shadow.set_state(torch.random.get_rng_state())
            else:
                self.shadow.set_state(torch.cuda.get_rng_state(y.device))
            y_bar = physics.U_adjoint(y)
            torch.randn(y_bar.shape, dtype=y_bar.dtype, device=y_bar.device, generator=self.shadow)  # DDRM's first draw
            out = super().forward(y, physics)
        self.physics = None
        return out


def diffpir(prior: EpsilonPrior, n_steps: int, observers: Sequence[StepObserver] = (), *,
            data_fidelity=None, zeta: float = 0.1, lambda_: float = 7.0, sigma: float = 0.05) -> ObservedDiffPIR:
    """deepinv's DiffPIR on our prior, observed: ``n_steps + 1`` denoiser calls, ``n_steps`` events (one
    fewer when DiffPIR's grid repeats its last level, e.g. ``n_steps = 1000``).

    Measurements and physics are deepinv's [0, 1] convention: for a linear operator and ``y`` of the
    prior-range image, pass ``(y + physics.A(ones)) / 2`` and a noise model with half the std."""
    return ObservedDiffPIR(UnitRangeDenoiser(prior), data_fidelity, observers, sigma=sigma,
                           max_iter=n_steps + 1, zeta=zeta, lambda_=lambda_)


def ddrm(prior: EpsilonPrior, n_steps: int, observers: Sequence[StepObserver] = (), *,
         eta: float = 0.85, etab: float = 1.0, sigma_max: float = 1.0) -> ObservedDDRM:
    """deepinv's DDRM on our prior, observed: noise levels ``linspace(sigma_max, 0, n_steps + 1)`` in
    [0, 1] units (deepinv's default grid), ``n_steps`` events, ``sigma`` in the prior's units."""
    expect(isinstance(n_steps, int) and n_steps >= 1, "n_steps", "an integer >= 1", n_steps)
    return ObservedDDRM(UnitRangeDenoiser(prior), observers, sigmas=np.linspace(sigma_max, 0.0, n_steps + 1),
                        eta=eta, etab=etab, sigma_scale=2.0)
