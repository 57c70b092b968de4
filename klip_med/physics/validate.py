"""Argument checks shared by the physics constructors.

Every failure raises :class:`klip_med.errors.KLIPMedError` naming the argument, what was
expected and what was found.
"""

from __future__ import annotations

import math

import torch

from klip_med.errors import expect

MIN_IMAGE_SIZE = 8


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an integer (not a bool) ``>= minimum``."""
    expect(
        isinstance(value, int) and not isinstance(value, bool),
        name,
        f"an integer >= {minimum}",
        value,
    )
    expect(value >= minimum, name, f"an integer >= {minimum}", value)
    return int(value)


def check_float(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``float(value)`` if it is a finite real number inside the given interval."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    what = f"a finite number in {interval}"
    expect(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        name,
        what,
        value,
    )
    value = float(value)
    expect(math.isfinite(value), name, what, value)
    if low is not None:
        expect(value > low if low_open else value >= low, name, what, value)
    if high is not None:
        expect(value < high if high_open else value <= high, name, what, value)
    return value


def check_image_size(image_size: object) -> int:
    """Image side length in pixels: an integer >= 8."""
    return check_int("image_size", image_size, MIN_IMAGE_SIZE)


def check_noise_sigma(noise_sigma: object) -> float:
    """Gaussian noise standard deviation in measurement units: a finite number >= 0."""
    return check_float("noise_sigma", noise_sigma, low=0.0)


def check_generator(generator: object, device: torch.device | str) -> torch.Generator | None:
    """``None`` or a :class:`torch.Generator` living on the same device type as ``device``.

    deepinv noise models draw with ``torch.empty_like(y).normal_(generator=rng)``, which needs the
    generator on the measurement's device.
    """
    if generator is None:
        return None
    expect(isinstance(generator, torch.Generator), "generator", "a torch.Generator or None", type(generator).__name__)
    wanted = torch.device(device).type
    expect(
        generator.device.type == wanted,
        "generator",
        f"a torch.Generator on device type '{wanted}' (the physics device)",
        f"a generator on '{generator.device.type}'",
    )
    return generator
