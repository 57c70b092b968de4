"""The JSON config stored next to a prior's safetensors weights.

It says everything needed to rebuild the network and use it correctly, and where it came from::

    {
      "format": "klip-med-prior", "format_version": 1,
      "name": "mri-brain-flair-128", "modality": "MR", "image_size": 128,
      "architecture": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                       "channels": [32, 64, 128, 128], "attention_levels": [false, false, false, true],
                       "num_res_blocks": 2, "num_head_channels": 32, "norm_num_groups": 16},
      "schedule": {"kind": "monai-ddpm", "num_train_timesteps": 1000, "schedule": "linear_beta",
                   "beta_start": 0.0001, "beta_end": 0.02},
      "intensity": {"kind": "mr-percentile", "percentile": 99.5, "reference": 0.8},
      "weights_dtype": "float16",
      "training": {...}          # manifest + checksums, steps, losses, device, time, licence
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klip_med.errors import KLIPMedError, check_keys
from klip_med.priors.intensity import IntensityRule

FORMAT = "klip-med-prior"
FORMAT_VERSION = 1
WEIGHTS_DTYPES = ("float32", "float16", "bfloat16")

_ARCH_KEYS = {
    "spatial_dims": int, "in_channels": int, "out_channels": int, "channels": list,
    "attention_levels": list, "num_res_blocks": (int, list), "num_head_channels": (int, list),
    "norm_num_groups": int, "resblock_updown": bool,
}
_ARCH_REQUIRED = {"spatial_dims", "in_channels", "out_channels", "channels", "attention_levels"}
_SCHEDULE_KEYS = {"kind", "num_train_timesteps", "schedule", "beta_start", "beta_end"}
_TOP_KEYS = {"format", "format_version", "name", "modality", "image_size", "architecture", "schedule",
             "intensity", "weights_dtype", "training", "description"}
_TOP_REQUIRED = _TOP_KEYS - {"training", "description"}


@dataclass
class PriorConfig:
    """A validated prior config. ``training`` is free-form provenance (kept, not interpreted)."""

    name: str
    modality: str
    image_size: int
    architecture: dict[str, Any]
    schedule: dict[str, Any]
    intensity: IntensityRule
    weights_dtype: str = "float32"
    training: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
            "modality": self.modality, "image_size": self.image_size, "description": self.description,
            "architecture": self.architecture, "schedule": self.schedule,
            "intensity": self.intensity.to_dict(), "weights_dtype": self.weights_dtype,
            "training": self.training,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> PriorConfig:
        """Validate a parsed config; every rule broken raises :class:`KLIPMedError` naming ``source``."""
        if not isinstance(data, dict):
            raise KLIPMedError(f"{source}: expected a JSON object, found {type(data).__name__}")
        check_keys(data, source, _TOP_KEYS, _TOP_REQUIRED)
        if data["format"] != FORMAT or data["format_version"] != FORMAT_VERSION:
            raise KLIPMedError(
                f"{source}: expected format {FORMAT!r} version {FORMAT_VERSION}, found "
                f"{data['format']!r} version {data['format_version']!r}"
            )
        if data["modality"] not in ("MR", "CT"):
            raise KLIPMedError(f"{source}: modality: expected 'MR' or 'CT', found {data['modality']!r}")
        size = data["image_size"]
        if not isinstance(size, int) or size < 8:
            raise KLIPMedError(f"{source}: image_size: expected an integer >= 8, found {size!r}")
        arch = data["architecture"]
        if not isinstance(arch, dict):
            raise KLIPMedError(f"{source}: architecture: expected an object, found {arch!r:.60}")
        check_keys(arch, f"{source}: architecture", set(_ARCH_KEYS), _ARCH_REQUIRED)
        for key, kind in _ARCH_KEYS.items():
            if key in arch and not isinstance(arch[key], kind):
                raise KLIPMedError(f"{source}: architecture.{key}: expected {kind}, found {arch[key]!r}")
        if arch["spatial_dims"] != 2:
            raise KLIPMedError(f"{source}: architecture.spatial_dims: expected 2, found {arch['spatial_dims']}")
        sched = data["schedule"]
        if not isinstance(sched, dict) or set(sched) != _SCHEDULE_KEYS:
            raise KLIPMedError(f"{source}: schedule: expected exactly the keys {sorted(_SCHEDULE_KEYS)}, found {sched!r:.120}")
        if sched["kind"] != "monai-ddpm":
            raise KLIPMedError(f"{source}: schedule.kind: expected 'monai-ddpm', found {sched['kind']!r}")
        if data["weights_dtype"] not in WEIGHTS_DTYPES:
            raise KLIPMedError(f"{source}: weights_dtype: expected one of {WEIGHTS_DTYPES}, found {data['weights_dtype']!r}")
        if not isinstance(data["intensity"], dict):
            raise KLIPMedError(f"{source}: intensity: expected an object, found {data['intensity']!r:.60}")
        try:
            intensity = IntensityRule.from_dict(data["intensity"])
        except KLIPMedError as exc:
            raise KLIPMedError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise KLIPMedError(f"{source}: intensity: {exc}") from None
        return cls(
            name=str(data["name"]), modality=data["modality"], image_size=size, architecture=dict(arch),
            schedule=dict(sched), intensity=intensity, weights_dtype=data["weights_dtype"],
            training=dict(data.get("training") or {}), description=str(data.get("description", "")),
        )

    @classmethod
    def read(cls, path: str | Path) -> PriorConfig:
        path = Path(path)
        if not path.is_file():
            raise KLIPMedError(f"config: expected a JSON file next to the weights, found none at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KLIPMedError(f"{path}: expected valid JSON, found a parse error: {exc}") from None
        return cls.from_dict(data, source=str(path))


def default_architecture(channels: tuple[int, ...] = (32, 64, 128, 128)) -> dict[str, Any]:
    """The house UNet: 4 levels, 2 residual blocks each, attention at the lowest resolution only."""
    return {
        "spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": list(channels),
        "attention_levels": [False] * (len(channels) - 1) + [True], "num_res_blocks": 2,
        "num_head_channels": min(32, channels[-1]), "norm_num_groups": 16,
    }


def default_schedule(num_train_timesteps: int = 1000) -> dict[str, Any]:
    """The DDPM linear-beta schedule of Ho et al. (beta 1e-4 → 0.02 over 1000 steps)."""
    return {"kind": "monai-ddpm", "num_train_timesteps": num_train_timesteps, "schedule": "linear_beta",
            "beta_start": 1e-4, "beta_end": 0.02}
