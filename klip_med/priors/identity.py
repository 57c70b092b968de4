"""Which prior produced a result: its name, config and a digest of its weights.

Caches (``klip-med eval``) and null models (``klip-med calibrate``) record it, so neither outlives
a retrained prior.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def prior_identity(prior) -> dict:
    """``{"name", "config", "weights_sha256"}`` of a prior.

    ``weights_sha256`` is the SHA-256 over the network's state dict (sorted names, float32 bytes),
    so it changes with any retraining and not with the file the weights were read from. A prior
    without a network (the analytic Gaussian prior) hashes nothing: the digest of no bytes.
    """
    digest = hashlib.sha256()
    module = prior if isinstance(prior, torch.nn.Module) else getattr(prior, "unet", None)
    if module is not None:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    config = getattr(prior, "config", None)
    return {"name": getattr(config, "name", type(prior).__name__),
            "config": config.to_dict() if hasattr(config, "to_dict") else None,
            "weights_sha256": digest.hexdigest()}


def prior_provenance(prior, reference: str) -> dict[str, Any]:
    """Name, where it came from, its config (minus the architecture) and a digest of that config."""
    from klip_med.priors import available

    config = prior.config.to_dict()
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    shipped = available()
    training = config.get("training", {})
    keep = ("manifest", "steps_trained", "final_loss", "device", "licence", "data", "seconds")
    return {
        "name": config["name"],
        "reference": reference,
        "shipped": reference in shipped,
        "modality": config["modality"],
        "image_size": config["image_size"],
        "intensity": config["intensity"],
        "schedule": config["schedule"],
        "description": config.get("description", ""),
        "training": {k: training[k] for k in keep if k in training},
        "config_sha256": digest,
    }
