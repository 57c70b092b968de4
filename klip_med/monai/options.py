"""Arguments of the MONAI transforms turned into what the pipeline takes: the prior, the windows,
the input as a plain tensor copy."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from klip_med.errors import KLIPMedError, expect
from klip_med.pipeline.settings import parse_window
from klip_med.score import Window


def load_prior(prior: Any, device: torch.device):
    """A prior on ``device``: loaded by name / path, or the given module (copied if it must move)."""
    from klip_med import priors

    if isinstance(prior, str) or hasattr(prior, "__fspath__"):
        return priors.load(prior, device=device)
    expect(hasattr(prior, "eps") and hasattr(prior, "image_shape"), "prior",
           "a shipped prior name, a prior folder or a DiffusionPrior", type(prior).__name__)
    current = getattr(prior, "device", None)
    if isinstance(prior, torch.nn.Module) and current is not None and torch.device(current) != device:
        prior = copy.deepcopy(prior).to(device)  # never move the caller's module
    return prior


def parse_windows(windows: Any, prior) -> tuple[Window, ...]:
    items = (windows,) if isinstance(windows, (str, Window)) else tuple(windows)
    expect(len(items) > 0, "windows", "at least one window ('full', 't:a,b', 'sigma:a,b', a Window)", "none")
    out = []
    for item in items:
        if isinstance(item, Window):
            out.append(item)
            continue
        expect(isinstance(item, str), "windows", "spec strings or Window objects", type(item).__name__)
        alphas = getattr(prior, "alphas_cumprod", None)
        expect(alphas is not None or not item.strip().startswith("t:"), "windows",
               "a prior with alphas_cumprod for a 't:a,b' window", type(prior).__name__)
        out.append(parse_window(item, alphas))
    return tuple(out)


def as_tensor(img: Any, argument: str) -> torch.Tensor:
    """A detached plain-tensor copy of ``img`` (the input is never modified)."""
    if isinstance(img, MetaTensor):
        return img.as_tensor().detach().clone()
    if isinstance(img, torch.Tensor):
        return img.detach().clone()
    try:
        return torch.as_tensor(np.array(img))
    except (TypeError, ValueError) as exc:
        raise KLIPMedError(f"{argument}: expected a tensor or array, found {type(img).__name__}") from exc


def prior_name(prior) -> str:
    config = getattr(prior, "config", None)
    return str(getattr(config, "name", type(prior).__name__))


def null_summary(null, description: str, slices: list[dict], z_max, rule: tuple[str, float]) -> dict[str, Any]:
    """``meta["klip"]``'s null fields: the model used, and with one each slice's ``z_max`` and
    ``slice_p`` (written into ``slices``), the input's ``volume_p`` and the z threshold of ``rule``.

    Args:
        z_max: each slice's (largest in-body z or None, in-body blocks), or None without a model.
    """
    out: dict[str, Any] = {"null_model": description}
    if null is None or z_max is None:
        return out
    for entry, (value, n) in zip(slices, z_max, strict=True):
        entry["z_max"] = None if value is None else round(value, 4)
        entry["slice_p"] = None if value is None else float(null.family_p(value, n))
    found = [v for v, _ in z_max if v is not None]
    total = sum(n for _, n in z_max)
    kind, alpha = rule
    out.update(z_max=round(max(found), 4) if found else None,
               volume_p=float(null.family_p(max(found), total, volume=True)) if found else None,
               z_threshold={"rule": f"{kind}:{alpha:g}", "in_body_blocks": total,
                            "z": round(null.family_threshold(alpha, max(total, 1), volume=True), 4)})
    return out
