"""Parse CLI physics strings such as ``ct-sparse:views=60`` or ``mri:accel=4,center=0.08``.

Grammar: ``KIND`` or ``KIND:key=value[,key=value...]`` (spaces around tokens ignored).

=============== ============================== ==================================================
kind            keys (required first)          constructor
=============== ============================== ==================================================
ct-sparse       views, noise, circle           :func:`~klip_med.physics.sparse_view_ct`
ct-limited      range, views, noise, circle    :func:`~klip_med.physics.limited_angle_ct`
ct-lowdose      i0, views, mu, noise, circle   :func:`~klip_med.physics.low_dose_ct`
mri             accel, center, mask, noise     :func:`~klip_med.physics.cartesian_mri`
mri-multicoil   accel, center, mask, noise     :func:`~klip_med.physics.multicoil_mri`
=============== ============================== ==================================================

``noise`` is the Gaussian ``noise_sigma`` (measurement units) for every kind; for ``ct-lowdose`` it
is extra Gaussian noise on top of the photon noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from klip_med.errors import KLIPMedError, expect
from klip_med.physics.ct import limited_angle_ct, low_dose_ct, sparse_view_ct
from klip_med.physics.mri import MASK_GENERATORS, cartesian_mri, multicoil_mri

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # accepts "1e2"; raises ValueError on junk
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(text)


def _parse_mask(text: str) -> str:
    if text not in MASK_GENERATORS:
        raise ValueError(text)
    return text


@dataclass(frozen=True)
class _Key:
    argument: str  # constructor keyword
    parse: Callable[[str], object]
    what: str  # expected value, in words
    required: bool = False


_NOISE = _Key("noise_sigma", _parse_float, "a finite number >= 0")
_CIRCLE = _Key("circle", _parse_bool, "a boolean (true/false/1/0/yes/no)")
_VIEWS = _Key("views", _parse_int, "an integer >= 1")
_MRI_KEYS = {
    "accel": _Key("acceleration", _parse_float, "a number >= 1", required=True),
    "center": _Key("center_fraction", _parse_float, "a number in [0, 1)"),
    "mask": _Key("mask_kind", _parse_mask, f"one of {', '.join(sorted(MASK_GENERATORS))}"),
    "noise": _NOISE,
}

KINDS: dict[str, dict[str, _Key]] = {
    "ct-sparse": {"views": _Key("views", _parse_int, "an integer >= 1", required=True), "noise": _NOISE, "circle": _CIRCLE},
    "ct-limited": {
        "range": _Key("angular_range_deg", _parse_float, "degrees in (0, 180]", required=True),
        "views": _VIEWS,
        "noise": _NOISE,
        "circle": _CIRCLE,
    },
    "ct-lowdose": {
        "i0": _Key("i0", _parse_float, "a photon count > 0", required=True),
        "views": _VIEWS,
        "mu": _Key("mu", _parse_float, "a number > 0"),
        "noise": _NOISE,
        "circle": _CIRCLE,
    },
    "mri": _MRI_KEYS,
    "mri-multicoil": _MRI_KEYS,
}

_BUILDERS = {
    "ct-sparse": sparse_view_ct,
    "ct-limited": limited_angle_ct,
    "ct-lowdose": low_dose_ct,
    "mri": cartesian_mri,
    "mri-multicoil": multicoil_mri,
}
_EXTRA_KW = {
    "ct-sparse": {"generator", "device", "dtype"},
    "ct-limited": {"generator", "device", "dtype"},
    "ct-lowdose": {"generator", "device", "dtype"},
    "mri": {"generator", "device"},
    "mri-multicoil": {"generator", "device", "coil_maps"},
}


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """Split ``spec`` into its kind and constructor keyword arguments (values parsed, not range-checked)."""
    expect(isinstance(spec, str), "spec", "a string like 'ct-sparse:views=60'", type(spec).__name__)
    kind, _, body = spec.strip().partition(":")
    kind = kind.strip()
    expect(kind in KINDS, f"spec {spec!r}", f"a kind among {', '.join(sorted(KINDS))}", repr(kind))
    table = KINDS[kind]
    kwargs: dict[str, object] = {}
    seen: set[str] = set()
    for item in (part.strip() for part in body.split(",")) if body.strip() else ():
        key, eq, text = (s.strip() for s in item.partition("="))
        expect(bool(eq) and bool(key), f"spec {spec!r}", "items of the form key=value", repr(item))
        expect(
            key in table,
            f"spec {spec!r}",
            f"keys among {', '.join(sorted(table))} for kind {kind}",
            repr(key),
        )
        expect(key not in seen, f"spec {spec!r}", "each key at most once", f"{key!r} repeated")
        seen.add(key)
        entry = table[key]
        try:
            kwargs[entry.argument] = entry.parse(text)
        except ValueError:
            raise KLIPMedError(f"spec {spec!r} key {key!r}: expected {entry.what}, found {text!r}") from None
    missing = [k for k, e in table.items() if e.required and k not in seen]
    expect(not missing, f"spec {spec!r}", f"required key(s) {', '.join(missing)} for kind {kind}", "none")
    return kind, kwargs


def parse_physics(spec: str, image_size: int, **kw: object):
    """Build the operator described by a CLI string.

    Args:
        spec: e.g. ``"ct-sparse:views=60"``, ``"ct-limited:range=120"``, ``"ct-lowdose:i0=1e4"``,
            ``"mri:accel=4,center=0.08"``, ``"mri:accel=8,center=0,mask=equispaced,noise=0.01"``,
            ``"mri-multicoil:accel=4"`` (needs ``coil_maps=``).
        image_size: image side in pixels.
        **kw: ``generator``, ``device`` (all kinds), ``dtype`` (CT), ``coil_maps`` (required for
            ``mri-multicoil``).

    Returns:
        The operator (a ``deepinv.physics.LinearPhysics`` with ``describe()``).

    Raises:
        KLIPMedError: unknown kind/key, malformed or out-of-range value, unexpected keyword.
    """
    kind, kwargs = parse_spec(spec)
    allowed = _EXTRA_KW[kind]
    unknown = sorted(set(kw) - allowed)
    expect(
        not unknown,
        "parse_physics keyword",
        f"keywords among {', '.join(sorted(allowed))} for kind {kind}",
        ", ".join(unknown),
    )
    kwargs.update(kw)
    if kind == "mri-multicoil":
        expect("coil_maps" in kw, "coil_maps", "complex coil maps (N_coils, H, W) for kind mri-multicoil", "none")
        return multicoil_mri(image_size=image_size, **kwargs)
    return _BUILDERS[kind](image_size, **kwargs)
