"""Training throughput: images per second of ``klip-med train``'s own step at several batch sizes,
and the largest batch that still helps.

The step is :func:`klip_med.priors.train_step.train_step` (augmentation, noise, forward, backward,
AdamW, EMA) on the prior's network, with its trained weights, on random images in [-1, 1] (the
arithmetic does not depend on the pixels). Each batch size gets ``warmup`` untimed steps (cuDNN
autotuning, compilation) and then ``steps`` timed ones.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from klip_med.bench.timing import Clock, environment
from klip_med.errors import expect


def choose_batch(rates: Sequence[tuple[int, float]], min_gain: float = 0.15) -> tuple[int, str]:
    """The largest batch that helps: walk up the batch sizes while each gives at least
    ``1 + min_gain`` times the images per second of the one before.

    Args:
        rates: ``(batch, images_per_second)``, batches increasing.
        min_gain: the smallest relative gain in images/s that still counts as helping.

    Returns:
        ``(batch, reason)``.
    """
    expect(bool(rates), "rates", "at least one (batch, images/s) pair", "none")
    batches = [b for b, _ in rates]
    expect(all(b2 > b1 for b1, b2 in pairwise(batches)), "rates", "increasing batch sizes", str(batches))
    chosen, best = rates[0]
    for batch, ips in rates[1:]:
        if ips < (1.0 + min_gain) * best:
            return chosen, (f"batch {batch} gives {ips:.3g} images/s, less than {1 + min_gain:.2f} x "
                            f"{best:.3g} at batch {chosen}")
        chosen, best = batch, ips
    return chosen, f"every larger batch helped up to the largest tried, {chosen} ({best:.3g} images/s)"


def train_throughput(prior: str, device: str = "cpu", batches: Sequence[int] = (64, 128, 256), *,
                     steps: int = 5, warmup: int = 2, options=None, seed: int = 0, image_size: int | None = None,
                     deadline: float | None = None, min_gain: float = 0.15) -> dict[str, Any]:
    """Time the training step at each batch size; returns a JSON-ready dict.

    Args:
        prior: shipped prior name or folder (its network and weights).
        device: ``cpu`` or ``cuda[:N]``.
        batches: batch sizes, increasing.
        steps, warmup: timed and untimed steps per batch size.
        options: :class:`~klip_med.priors.train_step.TrainOptions` (default: as ``klip-med train``).
        seed: seeds the images and the step's generator.
        image_size: another image side than the prior's: an untrained network of the same
            architecture at that size (e.g. to size the batch of a 256x256 prior before it exists).
        deadline: ``time.time()`` after which no further batch size starts.
        min_gain: :func:`choose_batch`'s threshold.

    The dict: ``prior``, ``device_name``, ``options``, ``rows`` (per batch: ``batch``,
    ``seconds_per_step``, ``images_per_second``, ``peak_gpu_bytes``, or ``error`` / ``skipped``),
    ``chosen_batch`` and ``reason`` (None when no batch size finished).
    """
    from klip_med.bench.case import load_prior
    from klip_med.priors.diffusion import build_scheduler
    from klip_med.priors.train import TrainSettings
    from klip_med.priors.train_step import TrainOptions, compile_network, make_optimizer, train_step

    expect(steps >= 1 and warmup >= 0, "steps / warmup", "steps >= 1 and warmup >= 0", f"{steps} / {warmup}")
    options = options or TrainOptions()
    dev = torch.device(device)
    clock = Clock(dev)
    loaded, trained = load_prior(prior, image_size, device, seed)
    config = loaded.config
    size = config.image_size
    gen = torch.Generator(device=dev).manual_seed(seed)
    images = torch.rand((max(batches), 1, size, size), generator=gen, device=dev) * 2 - 1
    scheduler = build_scheduler(config)
    bf16, channels_last = options.bf16(dev), options.use_channels_last(dev)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        if deadline is not None and time.time() > deadline:
            rows.append({"batch": batch, "skipped": "time budget"})
            continue
        settings = TrainSettings(name=config.name, batch_size=batch, channels=tuple(config.architecture["channels"]),
                                 num_train_timesteps=config.schedule["num_train_timesteps"], flip_lr=True,
                                 rotate_deg=5.0, scale_jitter=0.05, gain_jitter=0.05, seed=seed)
        unet = copy.deepcopy(loaded.unet).requires_grad_(True).train()
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        opt = make_optimizer(unet, settings, dev, options)
        ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
        net = compile_network(unet, options)

        def step(net=net, unet=unet, opt=opt, ema=ema, settings=settings) -> torch.Tensor:
            return train_step(net, unet, opt, ema, scheduler, images, settings, gen, bf16=bf16,
                              channels_last=channels_last)

        try:
            for _ in range(warmup):
                step()
            clock.reset_peak()
            _, seconds = clock.time(lambda: [step() for _ in range(steps)])
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # out of memory: larger ones fail too
            rows.append({"batch": batch, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            break
        rows.append({"batch": batch, "seconds_per_step": seconds / steps, "images_per_second": batch * steps / seconds,
                     "peak_gpu_bytes": clock.peak_bytes()})
        del unet, opt, ema, net
    done = [(r["batch"], r["images_per_second"]) for r in rows if "images_per_second" in r]
    chosen, reason = choose_batch(done, min_gain) if done else (None, "no batch size finished")
    env = environment(dev)
    return {"prior": config.name, "image_size": size, "weights": "trained" if trained else "random-init",
            "device": str(dev), "device_name": env["device_name"],
            "torch_version": env["torch_version"], "options": options.describe(dev), "steps": steps,
            "warmup": warmup, "rows": rows, "min_gain": min_gain, "chosen_batch": chosen, "reason": reason}
