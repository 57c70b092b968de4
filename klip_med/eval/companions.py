"""Companion models of a prior: small networks some baselines train on top of it (``dlsr``'s feature
denoiser, ``diffguard``'s level classifier), stored next to the prior they belong to.

A companion is a folder ``<prior folder>/<kind>/`` (shipped: ``klip_med/priors/shipped/<name>/<kind>/``)
holding ``config.json`` and ``weights.safetensors`` (only safetensors are read, never pickle). The
config records the kind, the prior's weights digest (:func:`klip_med.priors.identity.prior_identity`;
a companion is refused for any other prior, since it was trained on that prior's features or
schedule), the model's own settings, and how it was trained (command, steps, seconds, losses).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from klip_med._atomic import atomic_path
from klip_med.errors import KLIPMedError, expect
from klip_med.priors.diffusion import CONFIG_FILE, WEIGHTS_FILE, read_state_dict
from klip_med.priors.identity import prior_identity
from klip_med.priors.registry import resolve_prior_path

FORMAT = "klip-med-companion"
FORMAT_VERSION = 1
KINDS = ("dlsr", "diffguard")


def companion_dir(prior_reference: str | Path, kind: str) -> Path:
    """Where the ``kind`` companion of a prior (a shipped name or a prior folder) lives."""
    expect(kind in KINDS, "kind", f"one of {list(KINDS)}", kind)
    try:
        base = resolve_prior_path(prior_reference)
    except KLIPMedError as exc:
        raise KLIPMedError(f"{kind}: its companion model lives in the prior's folder, and {exc} (load the prior from "
                           f"a folder, or leave the baseline out with --skip {kind})") from None
    return (base.parent if base.suffix == ".safetensors" else base) / kind


def save_companion(folder: str | Path, kind: str, prior, model: dict, tensors: dict[str, Tensor],
                   training: dict, weights_dtype: str = "float32", exact: tuple[str, ...] = ()) -> Path:
    """Write ``config.json`` and ``weights.safetensors`` of a companion, atomically.

    Args:
        kind: one of :data:`KINDS`.
        prior: the prior it belongs to (its name and weights digest are recorded).
        model: the settings that rebuild the network (JSON-ready).
        tensors: name -> tensor, stored in ``weights_dtype``.
        training: provenance (command, data, steps, seconds, losses).
        exact: tensor names always stored in float32 (e.g. normalisation statistics).
    """
    from safetensors.torch import save_file

    expect(kind in KINDS, "kind", f"one of {list(KINDS)}", kind)
    expect(weights_dtype in ("float32", "float16"), "weights_dtype", "float32 or float16", weights_dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, weights_dtype)
    identity = prior_identity(prior)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
              "prior": {"name": identity["name"], "weights_sha256": identity["weights_sha256"]},
              "weights_dtype": weights_dtype, "model": model, "training": training}
    stored = {k: v.detach().to("cpu", torch.float32 if k in exact else dtype).contiguous() for k, v in tensors.items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(stored, str(tmp))
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return folder


def read_companion(folder: str | Path, kind: str, prior=None) -> tuple[dict, dict[str, Tensor]]:
    """The config and float32 tensors of a companion folder.

    Args:
        prior: when given, the companion must have been trained for exactly this prior (weights digest).

    Raises:
        KLIPMedError: a missing folder or file (with the command that trains one), another kind or
            format, or a companion of another prior.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise KLIPMedError(
            f"{folder}: expected a {kind} companion model ({CONFIG_FILE} + {WEIGHTS_FILE}), found none. Train one "
            f"with `klip-med train-baseline --kind {kind} --prior PRIOR --manifest M --data-root R --out {folder}`, "
            f"or leave the baseline out with `--skip {kind}`")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KLIPMedError(f"{config_path}: expected a JSON companion config, found an unreadable file ({exc})") from None
    expect(isinstance(config, dict) and config.get("format") == FORMAT, str(config_path), f"format {FORMAT!r}",
           config.get("format") if isinstance(config, dict) else type(config).__name__)
    expect(config.get("format_version") == FORMAT_VERSION, f"{config_path}: format_version", str(FORMAT_VERSION),
           config.get("format_version"))
    expect(config.get("kind") == kind, f"{config_path}: kind", repr(kind), config.get("kind"))
    if prior is not None:
        want = prior_identity(prior)["weights_sha256"]
        have = config.get("prior", {}).get("weights_sha256")
        expect(have == want, f"{config_path}: prior", f"a companion trained for this prior (weights {want[:12]}...; "
               f"retrain with `klip-med train-baseline --kind {kind}`)", f"one for weights {str(have)[:12]}...")
    tensors = read_state_dict(folder / WEIGHTS_FILE)
    for name, t in tensors.items():
        expect(bool(torch.isfinite(t).all()), f"{folder / WEIGHTS_FILE}: tensor {name}", "finite values", "NaN or inf")
    return config, {k: v.to(torch.float32) for k, v in tensors.items()}


def load_state(module: torch.nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Load ``tensors`` into ``module``, naming missing / unexpected tensors and shape mismatches."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    expect(not missing and not extra, where, "the tensors of the network its config describes",
           f"{len(missing)} missing (e.g. {missing[:2]}) and {len(extra)} unexpected (e.g. {extra[:2]})")
    for key, ref in expected.items():
        expect(tuple(tensors[key].shape) == tuple(ref.shape), f"{where}: tensor {key}", f"shape {tuple(ref.shape)}",
               tuple(tensors[key].shape))
    module.load_state_dict(tensors)


def init_parameters(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Re-initialise every weight from ``generator`` (PyTorch's default initialisers draw from the
    global generator): ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for linear and convolution weights
    and biases (PyTorch's default bound), ones / zeros for norm layers."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
            elif isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
    return module


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to lr / 10 at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_curve(losses: list[float], points: int = 20) -> list[list[float]]:
    """``[[last step of chunk, mean loss of chunk], ...]``: about ``points`` chunks of the per-step losses."""
    if not losses:
        return []
    edges = np.unique(np.linspace(0, len(losses), points + 1).round().astype(int))
    return [[int(b), round(float(np.mean(losses[a:b])), 6)] for a, b in zip(edges[:-1], edges[1:], strict=True)]
