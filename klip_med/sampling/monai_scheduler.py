"""Posterior sampling in the loop a MONAI user writes, with one StepEvent per step.

A MONAI diffusion user samples with a scheduler's ``step``::

    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        out = model(x, t)
        x, x0 = scheduler.step(out, t, x, generator=g)          # DDIMScheduler: step(out, t, x, eta, g)

:class:`MonaiDPS` and :class:`MonaiScoreGuided` run exactly that loop with MONAI's own
``DDPMScheduler`` / ``DDIMScheduler`` (a copy: the caller's is not changed), and make it a posterior
sampler. The prior step is ``scheduler.step`` on the prior's output with the step's noise draw
(the generator state is saved before the posterior step and replayed), so
``delta = x_post - x_prior`` is exact whatever the scheduler's prediction type, clipping or
variance type. ``noise_std`` is read off ``scheduler.step`` itself (two draws differ by exactly
``s_k`` times their noise difference), ``sigma`` is the canonical VP level of the step's input,
``g = sqrt(beta_t)`` and ``dt`` the training timesteps the step's formula spans (1 for
``DDPMScheduler``, whose step always goes from ``t`` to ``t - 1``: with fewer inference steps than
training steps its chain skips timesteps, a MONAI behaviour; use ``DDIMScheduler`` with ``eta = 1``
to respace an ancestral sampler).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from klip_med.errors import expect
from klip_med.sampling.base import SampleResult, check_measurement_fits
from klip_med.score.events import StepEvent, StepObserver

Model = Callable[[Tensor, Tensor], Tensor]
"""``model(x_t (S, C, H, W), timesteps (S,) long) -> model output`` (for a MONAI ``DiffusionModelUNet``:
``lambda x, t: unet(x, timesteps=t)``; for a klip_med prior: ``prior.eps``)."""


class MonaiSchedulerSampler:
    """Base class: the MONAI ``scheduler.step`` loop with KLIP events. Subclasses implement :meth:`_posterior`.

    Args:
        model: the prior network, see :data:`Model`.
        scheduler: a MONAI ``DDPMScheduler`` or ``DDIMScheduler`` (copied; its ``set_timesteps`` is called
            on the copy).
        n_steps: inference steps (``scheduler.set_timesteps(n_steps)``).
        eta: DDIM's stochasticity (``DDIMScheduler`` only; 0 is deterministic and uses the SDE
            normalisation).
    """

    nfe_per_step = 1

    def __init__(self, model: Model, scheduler, n_steps: int, eta: float = 1.0) -> None:
        kind = type(scheduler).__name__
        expect(kind in ("DDPMScheduler", "DDIMScheduler"), "scheduler",
               "a MONAI DDPMScheduler or DDIMScheduler", kind)
        expect(callable(model), "model", "a callable model(x, t)", type(model).__name__)
        expect(isinstance(n_steps, int) and 1 <= n_steps <= scheduler.num_train_timesteps, "n_steps",
               f"an integer in [1, {scheduler.num_train_timesteps}] (the scheduler's training timesteps)", n_steps)
        expect(kind == "DDIMScheduler" or eta == 1.0, "eta", "1.0 for a DDPMScheduler (only DDIM has eta)", eta)
        expect(0.0 <= eta <= 1.0, "eta", "a DDIM stochasticity in [0, 1]", eta)
        self.model = model
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(n_steps)
        self.is_ddim = kind == "DDIMScheduler"
        self.eta = float(eta)

    @property
    def n_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def step_sigmas(self) -> tuple[float, ...]:
        """Canonical noise level of each step's input, in sampling order."""
        a = self.scheduler.alphas_cumprod.to(torch.float64)
        return tuple(float(((1 - a[t]) / a[t]).sqrt()) for t in self.scheduler.timesteps)

    def _span(self, t: int) -> float:
        """Training timesteps the scheduler's step formula spans from ``t``."""
        if not self.is_ddim:
            return 1.0
        prev = t - self.scheduler.num_train_timesteps // self.scheduler.num_inference_steps
        return float(t - max(prev, -1))

    def scheduler_step(self, out: Tensor, t: int, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """MONAI's ``scheduler.step`` as the user calls it: ``(x_prev, x0_hat)``."""
        if self.is_ddim:
            return self.scheduler.step(out, t, x, eta=self.eta, generator=generator)
        return self.scheduler.step(out, t, x, generator=generator)

    def _replayed_step(self, out: Tensor, t: int, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``scheduler.step`` with the generator in ``state``, and the noise that state draws."""
        gen, probe = torch.Generator(device=x.device), torch.Generator(device=x.device)
        gen.set_state(state)
        probe.set_state(state)
        z = torch.randn(out.shape, dtype=out.dtype, generator=probe, device=x.device)
        with torch.no_grad():
            return self.scheduler_step(out, t, x, gen)[0], z

    def _posterior(self, x: Tensor, t: int, timesteps: Tensor, y: Tensor, physics,
                   generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """The posterior step from ``x`` at timestep ``t``: ``(x_post, x0_hat, prior model output)``,
        drawing its noise from ``generator`` as the user's ``scheduler.step`` would."""
        raise NotImplementedError

    def sample(self, y: Tensor, physics, n_samples: int, image_shape: tuple[int, int, int],
               generator: torch.Generator, observers: Sequence[StepObserver] = ()) -> SampleResult:
        """Draw ``n_samples`` posterior samples of ``y``; arguments as :meth:`klip_med.sampling.PosteriorSampler.sample`.

        Randomness: ``randn(S, C, H, W)`` from ``generator`` for the start, then the scheduler's own draws.
        """
        expect(isinstance(n_samples, int) and n_samples >= 1, "n_samples", "an integer >= 1", n_samples)
        expect(isinstance(generator, torch.Generator), "generator", "a torch.Generator", type(generator).__name__)
        image_shape = tuple(int(v) for v in image_shape)
        check_measurement_fits(y, physics, image_shape)
        expect(y.shape[0] in (1, n_samples), "y", f"a batch of 1 or n_samples={n_samples} measurements", y.shape[0])
        y = y.expand(n_samples, *y.shape[1:])
        device = y.device
        x = torch.randn((n_samples, *image_shape), generator=generator, device=device, dtype=torch.float32)
        x_init = x
        a = self.scheduler.alphas_cumprod.to(torch.float64)
        for index, t_tensor in enumerate(self.scheduler.timesteps):
            t = int(t_tensor)
            timesteps = torch.full((n_samples,), t, dtype=torch.long, device=device)
            state = generator.get_state()
            x_post, x0_hat, out = self._posterior(x, t, timesteps, y, physics, generator)
            # the prior step: the same scheduler step on the prior's output with the same draw; a second
            # draw gives s_k, since scheduler.step is affine in its noise: x_a - x_b = s_k (z_a - z_b)
            x_prior, z_a = self._replayed_step(out, t, x, state)
            x_b, z_b = self._replayed_step(out, t, x, torch.Generator(device=device).manual_seed(12345).get_state())
            dz = z_a - z_b
            s = float(((x_prior - x_b) * dz).sum() / (dz * dz).sum())
            event = StepEvent(
                index=index, sigma=float(((1 - a[t]) / a[t]).sqrt()),
                noise_std=torch.full((), max(s, 0.0), dtype=torch.float32, device=device),
                delta=(x_post - x_prior).detach(), x=x_post.detach(), x0_hat=x0_hat.detach(),
                g=math.sqrt(float(self.scheduler.betas[t])), dt=self._span(t))
            for observe in observers:
                observe(event)
            x = x_post.detach()
        return SampleResult(samples=x, x_init=x_init, step_sigmas=self.step_sigmas,
                            nfe=self.n_steps * self.nfe_per_step)


class MonaiDPS(MonaiSchedulerSampler):
    """DPS in a MONAI scheduler loop: ``x_post = scheduler.step(...) - zeta * grad_x ||y - A x0_hat(x)||``.

    ``x0_hat`` is the scheduler's own ``pred_original_sample`` (its prediction type and clipping), so the
    gradient flows through MONAI's step; ``zeta = 0`` is the prior sampler. One forward and one backward
    pass per step. Other arguments as :class:`MonaiSchedulerSampler`.
    """

    def __init__(self, model: Model, scheduler, n_steps: int, zeta: float = 1.0, eta: float = 1.0) -> None:
        super().__init__(model, scheduler, n_steps, eta)
        expect(zeta >= 0, "zeta", "a guidance step size >= 0", zeta)
        self.zeta = float(zeta)

    def _posterior(self, x, t, timesteps, y, physics, generator):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = self.model(x_in, timesteps)
            x_prev, x0_hat = self.scheduler_step(out, t, x_in, generator)
            norms = torch.linalg.vector_norm((physics.A(x0_hat) - y).flatten(1), dim=1)
            (grad,) = torch.autograd.grad(norms.sum(), x_in)
        return x_prev.detach() - self.zeta * grad, x0_hat.detach(), out.detach()


class MonaiScoreGuided(MonaiSchedulerSampler):
    """The MONAI loop with a posterior model output: ``x_post = scheduler.step(model_post(x, t), t, x)``.

    ``model_post`` has the prior model's signature and output type (for an epsilon scheduler: the
    posterior's noise prediction, e.g. the exact one of a Gaussian case). Two network calls per step.
    """

    nfe_per_step = 2

    def __init__(self, model: Model, model_posterior: Model, scheduler, n_steps: int, eta: float = 1.0) -> None:
        super().__init__(model, scheduler, n_steps, eta)
        expect(callable(model_posterior), "model_posterior", "a callable model(x, t)",
               type(model_posterior).__name__)
        self.model_posterior = model_posterior

    def _posterior(self, x, t, timesteps, y, physics, generator):
        with torch.no_grad():
            out = self.model(x, timesteps)
            x_post, _ = self.scheduler_step(self.model_posterior(x, timesteps), t, x, generator)
            replay_free = torch.Generator(device=x.device).manual_seed(0)
            _, x0_hat = self.scheduler_step(out, t, x, replay_free)
        return x_post, x0_hat, out
