"""What a null model depends on, and the check that a run matches it.

A null model describes healthy KL under one prior (its weights), one operator, one set of sampler
settings, its windows and one block size. :func:`null_conditions` writes these down as a JSON-ready
dict; :func:`differences` compares two such dicts (numbers to 1e-6, so a model written with rounded
window edges still matches); :func:`null_windows` finds the model's windows among a run's.

Settings are a :class:`klip_med.pipeline.KLIPSettings` (``samples``, ``steps``, ``sampler``,
``normalization``, ``windows``, ``block_size`` and ``sampler_parameters()``: every sampler setting
that changes the maps).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from klip_med.errors import expect
from klip_med.score.windows import Window

TOLERANCE = 1e-6
"""Relative and absolute tolerance of numbers in conditions (window edges are stored rounded)."""


def weights_digest(prior) -> str:
    """SHA-256 of the prior's weights (a null model must not outlive a retrained prior)."""
    from klip_med.priors.identity import prior_identity

    return prior_identity(prior)["weights_sha256"]


def null_conditions(prior, physics_spec: str, settings, windows: Sequence[Window] | None = None,
                    weights_sha256: str | None = None) -> dict[str, Any]:
    """What a null model depends on: prior weights, operator, sampler settings, windows, block size.

    ``windows`` default to ``settings.windows``. The seed is not a condition (the model describes
    the distribution over seeds).
    """
    windows = settings.windows if windows is None else tuple(windows)
    return {
        "prior": getattr(getattr(prior, "config", None), "name", type(prior).__name__),
        "prior_weights_sha256": weights_sha256 or weights_digest(prior),
        "physics": physics_spec,
        "samples": settings.samples, "steps": settings.steps, "sampler": settings.sampler,
        "normalization": settings.normalization, **settings.sampler_parameters(),
        "windows": [w.as_dict() for w in windows], "block_size": settings.block_size,
    }


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def same_condition(a: Any, b: Any) -> bool:
    """Whether two JSON-like condition values agree (numbers within :data:`TOLERANCE`)."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_condition(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_condition(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def differences(fitted: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: fitted X, now Y"`` for each key of ``now`` whose value differs from ``fitted``'s."""
    return [f"{k}: fitted {fitted.get(k)!r}, now {v!r}" for k, v in now.items()
            if not same_condition(fitted.get(k), v)]


def null_windows(null, settings) -> list[int]:
    """Indices into ``settings.windows`` of the model's windows (matched by name and noise range).

    Raises:
        KLIPMedError: a window of the model is not among the run's.
    """
    have = [w.as_dict() for w in settings.windows]
    out = []
    for w in null.conditions.get("windows", []):
        found = [i for i, h in enumerate(have) if same_condition(h, w)]
        expect(bool(found), "null model windows", f"each of its windows among the run's ({[h['name'] for h in have]})",
               f"{w['name']} missing")
        out.append(found[0])
    return out


def run_conditions(null, prior, physics_spec: str, settings, weights_sha256: str | None = None) -> dict[str, Any]:
    """The run's :func:`null_conditions` over the model's windows (to compare with the model's)."""
    windows = [settings.windows[i] for i in null_windows(null, settings)]
    return null_conditions(prior, physics_spec, settings, windows, weights_sha256)
