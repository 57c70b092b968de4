"""Which blocks the OOD mask (the SEG) holds: threshold specs and the rule that applies them.

Specs (``--threshold``):

- ``"fpr:A"`` (needs a null model, :mod:`klip_med.calibration`): blocks whose null z-score reaches
  the level that a fraction ``A`` of in-distribution blocks reach (a calibrated false-positive
  rate per block);
- ``"pNN"``: blocks whose first-window density is at least the NN-th percentile of the densities of
  all in-body blocks of the volume (always flags about 1 - NN/100 of them; not calibrated);
- a number: a density in nats per working pixel;
- ``"auto"`` (the default): ``fpr:0.01`` when a null model applies, else ``p95``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from klip_med.errors import expect

AUTO_FPR = 0.01
"""False-positive rate per block of ``--threshold auto`` when a null model applies."""


def parse_threshold(text: str | float) -> tuple[str, float]:
    """``"p95"`` -> ``("percentile", 95.0)``; ``"1.5"`` -> ``("nats_per_pixel", 1.5)``;
    ``"fpr:0.01"`` -> ``("fpr", 0.01)``; ``"auto"`` -> ``("auto", nan)``."""
    raw = str(text).strip()
    try:
        if raw.lower() == "auto":
            return "auto", math.nan
        if raw.lower().startswith("fpr:"):
            value = float(raw[4:])
            ok = 0.0 < value < 1.0
            kind = "fpr"
        elif raw.lower().startswith("p"):
            value = float(raw[1:])
            ok = 0.0 <= value <= 100.0
            kind = "percentile"
        else:
            value = float(raw)
            ok = math.isfinite(value) and value >= 0
            kind = "nats_per_pixel"
    except ValueError:
        ok, kind, value = False, "", 0.0
    expect(ok, "--threshold", "'auto', 'fpr:A' (false-positive rate per block, 0 < A < 1, needs a null model), "
           "'pNN' (percentile of in-body block densities, 0-100) or a number of nats per pixel >= 0", repr(raw))
    return kind, value


def flag_blocks(result, spec: str | float, null=None) -> tuple[np.ndarray, dict[str, Any]]:
    """Which blocks the OOD mask holds, and how that was decided.

    Args:
        result: per-slice results with ``inside``, ``densities`` and ``zscores`` (Z, gh, gw) (a
            :class:`klip_med.io.outputs.VolumeResult`; ``zscores`` set when ``null`` is given).
        spec: threshold spec (:func:`parse_threshold`).
        null: the :class:`~klip_med.score.null.NullModel` the z-scores came from, or None.

    Returns:
        ``(flagged, info)``: bool ``(Z, gh, gw)`` (in-body blocks only) and the summary's
        ``threshold`` record.
    """
    kind, value = parse_threshold(spec)
    if kind == "auto":
        kind, value = ("fpr", AUTO_FPR) if null is not None else ("percentile", 95.0)
    info: dict[str, Any] = {"spec": str(spec), "kind": kind, "value": value}
    if kind == "fpr":
        expect(null is not None and result.zscores is not None, "--threshold",
               "a null model for 'fpr:A' (--null FILE from `klip-med calibrate`, or a shipped one for these settings)",
               f"{spec!r} with no null model")
        z_thr = null.z_threshold(value)
        flagged = result.inside & (result.zscores >= z_thr)
        info.update({"z_threshold": z_thr, "rule": f"OOD mask = in-body blocks whose null z-score >= {z_thr:.3f}, "
                     f"reached by a fraction {value:g} of in-distribution blocks ({null.source})"})
    else:
        thr = resolve_threshold(f"p{value}" if kind == "percentile" else value, result.densities, result.inside)
        flagged = result.inside & (result.densities >= thr)
        info.update({"nats_per_pixel": thr, "rule": "OOD mask = in-body blocks whose first-window density >= "
                     "threshold; 'pNN' = NN-th percentile of all in-body block densities of the volume (not "
                     "calibrated: it flags about 1 - NN/100 of the blocks of any volume)"})
    info["blocks_flagged"] = int(flagged.sum())
    return flagged, info


def resolve_threshold(spec: str | float, densities: np.ndarray, inside: np.ndarray) -> float:
    """The OOD threshold in nats per working pixel for block ``densities`` (Z, gh, gw) (``pNN`` or a number)."""
    kind, value = parse_threshold(spec)
    expect(kind in ("percentile", "nats_per_pixel"), "threshold", "'pNN' or a number of nats per pixel", spec)
    if kind == "nats_per_pixel":
        return value
    values = densities[inside] if bool(inside.any()) else densities.ravel()
    return float(np.percentile(values, value))

