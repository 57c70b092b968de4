"""The priors shipped with klip_med, by name, and loading a prior from a name or a path.

Shipped priors live in ``klip_med/priors/shipped/<name>/`` (``config.json``,
``weights.safetensors``, ``MODEL_CARD.md``, ``samples.png``), inside the package: they load offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from klip_med.errors import KLIPMedError
from klip_med.priors.config import PriorConfig
from klip_med.priors.diffusion import CONFIG_FILE, WEIGHTS_FILE, DiffusionPrior, load_prior_dir

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def available() -> dict[str, Path]:
    """Shipped prior names → their folders (only complete ones: config and weights present)."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {
        d.name: d for d in sorted(SHIPPED_DIR.iterdir())
        if (d / CONFIG_FILE).is_file() and (d / WEIGHTS_FILE).is_file()
    }


def describe(name: str) -> PriorConfig:
    """The config of a shipped prior (without loading its weights)."""
    return PriorConfig.read(resolve_prior_path(name) / CONFIG_FILE)


def model_card(name: str) -> str:
    """The text of a shipped prior's model card."""
    card = resolve_prior_path(name) / "MODEL_CARD.md"
    return card.read_text(encoding="utf-8") if card.is_file() else f"(no model card for {name})"


def resolve_prior_path(name_or_path: str | Path) -> Path:
    """The folder (or weights file) of a shipped prior name or a path; :class:`KLIPMedError` naming
    the shipped priors otherwise."""
    shipped = available()
    if isinstance(name_or_path, str) and name_or_path in shipped:
        return shipped[name_or_path]
    path = Path(name_or_path)
    if path.exists():
        return path
    names = ", ".join(shipped) or "none installed"
    raise KLIPMedError(
        f"prior: expected a shipped prior name ({names}) or a folder with {CONFIG_FILE} and "
        f"{WEIGHTS_FILE}, found {str(name_or_path)!r}. Train one with `klip-med train --manifest ... --out DIR`."
    )


def load(name_or_path: str | Path, device: str | torch.device = "cpu") -> DiffusionPrior:
    """Load a shipped prior by name (``load("mri-brain-flair-128")``) or any prior folder / weights path."""
    return load_prior_dir(resolve_prior_path(name_or_path), device=device)


def loaded(prior, device: str | torch.device = "cpu"):
    """``prior`` loaded on ``device`` when it is a name / folder (:func:`load`), else ``prior`` itself
    (a loaded prior, e.g. one an engine worker received)."""
    return load(prior, device=device) if isinstance(prior, (str, Path)) else prior
