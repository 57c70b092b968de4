"""Which blocks the OOD mask (the SEG) holds: threshold specs and the rule that applies them.

Specs (``--threshold``), with a null model (:mod:`klip_med.calibration`):

- ``"fwer:A"``: family-wise over the whole input volume: flag blocks whose z-score a healthy volume
  of the same number of in-body blocks reaches in its maximum with probability ``A`` (so a healthy
  volume gets any flag at all in a fraction ``A`` of cases); ``"fwer-slice:A"``: the same per slice;
- ``"fdr:Q"``: Benjamini-Hochberg over the block p-values of the volume at false-discovery rate
  ``Q``; ``"fdr-slice:Q"``: per slice;
- ``"fpr:A"``: per block, blocks that a fraction ``A`` of healthy blocks reach (a healthy volume of
  hundreds of blocks then almost always holds some flags);
- ``"auto"`` (the default): :data:`AUTO_RULE`, ``fwer:0.05``: what a reviewer expects of a flag, that
  a healthy scan gets none in at least 95% of cases.

Without a null model there is no calibrated mask: ``auto`` writes no SEG (the summary and the console
say so). Uncalibrated rules must be asked for by name: ``"pNN"`` (blocks at or above the NN-th
percentile of the volume's in-body first-window densities: it flags about 1 - NN/100 of the blocks
of any volume, healthy or not) or a number of nats per working pixel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from klip_med.calibration.levels import benjamini_hochberg
from klip_med.errors import expect

AUTO_RULE = ("fwer", 0.05)
"""``--threshold auto`` with a null model: family-wise 5% over the input volume."""
CALIBRATED = ("fwer", "fwer-slice", "fdr", "fdr-slice", "fpr")
"""Rules that need a null model."""
_USAGE = ("'auto', 'fwer:A' / 'fwer-slice:A' (family-wise per volume / slice), 'fdr:Q' / 'fdr-slice:Q' "
          "(Benjamini-Hochberg per volume / slice), 'fpr:A' (per block), with 0 < A, Q < 1 and a null model; "
          "or uncalibrated 'pNN' (percentile of in-body block densities, 0-100) or a number of nats per pixel >= 0")


def parse_threshold(text: str | float) -> tuple[str, float]:
    """``"fwer:0.05"`` -> ``("fwer", 0.05)``; ``"p95"`` -> ``("percentile", 95.0)``; ``"1.5"`` ->
    ``("nats_per_pixel", 1.5)``; ``"auto"`` -> ``("auto", nan)``."""
    raw = str(text).strip()
    kind, _, rest = raw.lower().partition(":")
    try:
        if raw.lower() == "auto":
            return "auto", math.nan
        if kind in CALIBRATED and rest:
            value = float(rest)
            ok = 0.0 < value < 1.0
        elif raw.lower().startswith("p"):
            kind, value = "percentile", float(raw[1:])
            ok = 0.0 <= value <= 100.0
        else:
            kind, value = "nats_per_pixel", float(raw)
            ok = math.isfinite(value) and value >= 0
    except ValueError:
        ok, kind, value = False, "", 0.0
    expect(ok, "--threshold", _USAGE, repr(raw))
    return kind, value


def _by_slice(inside: np.ndarray, per_slice: bool) -> list[tuple[slice, int]]:
    """The families: each slice, or the whole volume; with their in-body block counts."""
    if per_slice:
        return [(slice(k, k + 1), int(inside[k].sum())) for k in range(inside.shape[0])]
    return [(slice(0, inside.shape[0]), int(inside.sum()))]


def flag_blocks(result, spec: str | float, null=None) -> tuple[np.ndarray, dict[str, Any]]:
    """Which blocks the OOD mask holds, and how that was decided.

    Args:
        result: per-slice results with ``inside``, ``densities`` and ``zscores`` (Z, gh, gw) (a
            :class:`klip_med.io.outputs.VolumeResult`; ``zscores`` set when ``null`` is given).
        spec: threshold spec (:func:`parse_threshold`).
        null: the :class:`~klip_med.calibration.NullModel` the z-scores came from, or None.

    Returns:
        ``(flagged, info)``: bool ``(Z, gh, gw)`` (in-body blocks only; all False when no mask is
        written) and the summary's ``threshold`` record (``kind`` ``"none"`` when there is no
        calibrated mask to write).
    """
    kind, value = parse_threshold(spec)
    info: dict[str, Any] = {"spec": str(spec)}
    flagged = np.zeros(result.inside.shape, dtype=bool)
    if kind == "auto":
        if null is None:
            info.update({"kind": "none", "value": None, "blocks_flagged": 0,
                         "rule": "no OOD mask: no null model applies, so no flag could be calibrated (fit one with "
                                 "`klip-med calibrate`; an uncalibrated percentile mask is --threshold p95)"})
            return flagged, info
        kind, value = AUTO_RULE
    info.update({"kind": kind, "value": value})
    if kind in CALIBRATED:
        expect(null is not None and result.zscores is not None, "--threshold",
               f"a null model for {kind!r} (--null FILE from `klip-med calibrate`, or a shipped one for these settings)",
               f"{spec!r} with no null model")
        z = np.where(result.inside, result.zscores, -np.inf)
        if kind == "fpr":
            z_thr = null.z_threshold(value)
            flagged = z >= z_thr
            info.update({"z_threshold": z_thr, "rule": f"per block: in-body blocks with z >= {z_thr:.3f}, reached by a "
                         f"fraction {value:g} of healthy blocks ({null.source})"})
        elif kind.startswith("fwer"):
            thresholds = []
            for where, n in _by_slice(result.inside, kind == "fwer-slice"):
                if n:
                    z_thr = null.family_threshold(value, n, volume=kind == "fwer")
                    flagged[where] = z[where] >= z_thr
                    thresholds.append(z_thr)
            family = "slice" if kind == "fwer-slice" else "volume"
            info.update({"z_threshold": thresholds[0] if len(thresholds) == 1 else thresholds,
                         "rule": f"family-wise per {family}: in-body blocks with z at or above the level the largest "
                                 f"z of a healthy {family} with as many in-body blocks reaches with probability "
                                 f"{value:g} ({null.source})"})
        else:  # fdr
            p = np.where(result.inside, null.p_values(np.where(result.inside, result.zscores, 0.0)), 1.0)
            for where, _ in _by_slice(result.inside, kind == "fdr-slice"):
                inside = result.inside[where]
                keep = np.zeros(inside.shape, dtype=bool)
                keep[inside] = benjamini_hochberg(p[where][inside], value)
                flagged[where] = keep
            family = "slice" if kind == "fdr-slice" else "volume"
            info.update({"rule": f"Benjamini-Hochberg per {family} at false-discovery rate {value:g} over the in-body "
                                 f"blocks' p-values against healthy blocks ({null.source})"})
    else:
        thr = resolve_threshold(f"p{value}" if kind == "percentile" else value, result.densities, result.inside)
        flagged = result.inside & (result.densities >= thr)
        info.update({"nats_per_pixel": thr, "rule": "uncalibrated: in-body blocks whose first-window density >= "
                     "threshold; 'pNN' = NN-th percentile of all in-body block densities of the volume (it flags "
                     "about 1 - NN/100 of the blocks of any volume, healthy or not)"})
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
