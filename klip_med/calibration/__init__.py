"""Null calibration: how much KL a block carries when nothing is out of distribution, and what a
flag means.

- :mod:`~klip_med.calibration.null_model`: :class:`NullModel` (z-scores, p-values, thresholds, the
  JSON file); :mod:`~klip_med.calibration.fit`: :func:`fit_null` on healthy block maps.
- :mod:`~klip_med.calibration.tails`: block p-values with a fitted tail beyond the reference;
  :mod:`~klip_med.calibration.levels`: slice and volume p-values, family-wise thresholds, BH.
- :mod:`~klip_med.calibration.families`: the statistics behind it (comparison families, shrinkage,
  held-out scoring).
- :mod:`~klip_med.calibration.covariates`: per-block brightness, texture, distance to the body edge.
- :mod:`~klip_med.calibration.conditions`: what a model depends on and the check that a run matches.
- :mod:`~klip_med.calibration.store`: where models live and which one a run uses (``--null auto``).
- :mod:`~klip_med.calibration.scoring`: a model applied to one reconstruction.
- :mod:`~klip_med.calibration.thresholds`: the OOD mask rule (``--threshold``).

Fitting from images (sampling healthy reconstructions first) is
:func:`klip_med.pipeline.calibrate.calibrate_images`; ``klip-med calibrate`` on the command line.
"""

import importlib

# Loaded on first use (PEP 562): ``klip_med.io`` reads the thresholds without importing the priors.
_WHERE = {
    "NullModel": "null_model", "fit_null": "fit", "CONDITIONING": "families", "AUTO_FAMILIES": "families",
    "Tail": "tails", "family_p": "levels", "benjamini_hochberg": "levels",
    "block_covariates": "covariates", "null_conditions": "conditions", "null_windows": "conditions",
    "NULLS_DIR": "store", "resolve_null": "store", "apply_null": "scoring", "result_blocks": "scoring",
    "flag_blocks": "thresholds", "parse_threshold": "thresholds",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"klip_med.calibration.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'klip_med.calibration' has no attribute {name!r}")


__all__ = sorted(_WHERE)
