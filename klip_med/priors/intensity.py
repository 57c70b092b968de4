"""Intensity normalisation between physical units (HU, MR signal) and a prior's working range.

Priors work on images in [-1, 1]. Two rules, recorded in each prior's config:

- ``ct-hu-window``: ``x = 2 (clip(HU, lo, hi) - lo) / (hi - lo) - 1``. HU outside the window are
  clipped (the prior never sees them); back-mapping returns HU inside the window.
- ``mr-percentile``: MR signal has no absolute unit. Each volume (or slice stack) is scaled so that
  the ``percentile``-th percentile of its non-zero voxels lands on ``reference`` in [0, 1], then
  clipped to [0, 1] and mapped to [-1, 1]. The training data go through the same rule, so a user's
  scan and the training scans meet on the same scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from klip_med.errors import KLIPMedError, check_keys

RULES = ("ct-hu-window", "mr-percentile")


@dataclass(frozen=True)
class IntensityRule:
    """How physical intensities map to the prior's [-1, 1].

    Attributes:
        kind: ``ct-hu-window`` or ``mr-percentile``.
        hu_min, hu_max: the CT window in HU (``ct-hu-window``).
        percentile: in (0, 100], the percentile of non-zero voxels used as the MR scale.
        reference: in (0, 1], where that percentile lands in [0, 1] (``mr-percentile``).
    """

    kind: str
    hu_min: float | None = None
    hu_max: float | None = None
    percentile: float | None = None
    reference: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "ct-hu-window":
            ok = self.hu_min is not None and self.hu_max is not None and self.hu_max > self.hu_min
            if not ok:
                raise KLIPMedError(f"intensity: expected hu_min < hu_max, found {self.hu_min}, {self.hu_max}")
        elif self.kind == "mr-percentile":
            ok = (self.percentile is not None and 0 < self.percentile <= 100
                  and self.reference is not None and 0 < self.reference <= 1)
            if not ok:
                raise KLIPMedError(
                    "intensity: expected percentile in (0, 100] and reference in (0, 1], found "
                    f"{self.percentile}, {self.reference}"
                )
        else:
            raise KLIPMedError(f"intensity.kind: expected one of {RULES}, found {self.kind!r}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> IntensityRule:
        check_keys(data, "intensity", {"kind", "hu_min", "hu_max", "percentile", "reference"}, {"kind"})
        return cls(**data)

    def mr_scale(self, volume: np.ndarray) -> float:
        """The multiplier that brings ``volume``'s percentile of non-zero voxels to ``reference``."""
        values = np.asarray(volume, dtype=np.float64)
        nonzero = values[values > 0]
        if nonzero.size == 0:
            raise KLIPMedError("image: expected some voxels > 0 to set the MR scale, found none")
        level = float(np.percentile(nonzero, self.percentile))
        return self.reference / level

    def to_model(self, image: np.ndarray, scale: float | None = None) -> np.ndarray:
        """Physical intensities → [-1, 1] float32, same shape.

        Args:
            image: HU for CT; MR signal for MR (any shape; a whole volume sets the MR scale).
            scale: MR only: a multiplier computed once per volume by :meth:`mr_scale`; if None it
                is computed from ``image`` itself.
        """
        image = np.asarray(image, dtype=np.float32)
        if not np.isfinite(image).all():
            raise KLIPMedError("image: expected finite intensities, found NaN or inf")
        if self.kind == "ct-hu-window":
            unit = (np.clip(image, self.hu_min, self.hu_max) - self.hu_min) / (self.hu_max - self.hu_min)
        else:
            scale = self.mr_scale(image) if scale is None else scale
            unit = np.clip(image * scale, 0.0, 1.0)
        return (2.0 * unit - 1.0).astype(np.float32)

    def to_physical(self, model: np.ndarray, scale: float | None = None) -> np.ndarray:
        """[-1, 1] → HU (CT) or MR signal (needs the volume's ``scale``; None gives [0, 1])."""
        unit = (np.asarray(model, dtype=np.float32) + 1.0) / 2.0
        if self.kind == "ct-hu-window":
            return (unit * (self.hu_max - self.hu_min) + self.hu_min).astype(np.float32)
        return (unit / (1.0 if scale is None else scale)).astype(np.float32)

    @property
    def unit(self) -> str:
        """Physical unit name for outputs."""
        return "HU" if self.kind == "ct-hu-window" else "MR signal (arbitrary units)"


ABDOMEN_WINDOW = IntensityRule("ct-hu-window", hu_min=-160.0, hu_max=240.0)
"""The abdominal soft-tissue window W400 / L40."""
