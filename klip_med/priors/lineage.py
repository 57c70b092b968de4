"""What a continued training run inherits from the prior it continues (``klip-med train --init-from``).

A continued run starts the network and the EMA from the prior's exported EMA weights, with a fresh
optimiser. So that the exported prior still says what is behind its weights, the run carries the
lineage: the steps and seconds trained so far, each earlier run, the loss curve so far (one step
axis), and which weights it started from (their SHA-256).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from klip_med.errors import KLIPMedError
from klip_med.priors.config import PriorConfig
from klip_med.priors.diffusion import WEIGHTS_FILE, DiffusionPrior, load_prior_dir
from klip_med.priors.plateau import read_loss_csv

LOSS_FILE = "loss.csv"


def continued_prior(init_from: str | Path | None, config: PriorConfig) -> tuple[DiffusionPrior | None, dict[str, Any]]:
    """``(prior, lineage)``: the prior ``init_from`` names (None without one) and what it brings:
    ``steps``, ``seconds``, ``runs`` and loss ``rows`` so far, and ``continued_from`` (name, path,
    steps, weights SHA-256). The prior must have ``config``'s network, schedule, image size and
    intensity rule (else :class:`KLIPMedError`, naming ``--init-from``)."""
    if init_from is None:
        return None, {"steps": 0, "seconds": 0.0, "runs": [], "rows": [], "continued_from": None}
    init = load_prior_dir(init_from)
    for key in ("architecture", "schedule", "image_size"):
        if getattr(init.config, key) != getattr(config, key):
            hint = " (--channels)" if key == "architecture" else ""
            raise KLIPMedError(f"--init-from {init_from}: expected a prior with {key} {getattr(config, key)}"
                               f"{hint}, found {getattr(init.config, key)}")
    if init.config.intensity != config.intensity:
        raise KLIPMedError(f"--init-from {init_from}: expected the intensity rule of the training data "
                           f"{config.intensity.to_dict()}, found {init.config.intensity.to_dict()}")
    t = init.config.training or {}
    s = t.get("settings", {})
    runs = t.get("runs") or ([{"steps": t.get("steps_trained"), "seconds": t.get("train_seconds"),
                               "device": t.get("device"), "batch_size": s.get("batch_size"), "lr": s.get("lr"),
                               "mixed_precision": t.get("mixed_precision"), "compile": None}]
                             if t.get("steps_trained") else [])
    folder = Path(init_from) if Path(init_from).is_dir() else Path(init_from).parent
    weights = folder / WEIGHTS_FILE
    rows = read_loss_csv(folder / LOSS_FILE) if (folder / LOSS_FILE).is_file() else []
    return init, {
        "steps": int(t.get("steps_trained") or 0), "seconds": float(t.get("train_seconds") or 0.0),
        "runs": runs, "rows": [[int(a), float(b)] for a, b in rows],
        "continued_from": {"name": init.config.name, "path": str(init_from),
                           "steps_trained": int(t.get("steps_trained") or 0),
                           "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()},
    }
