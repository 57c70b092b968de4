"""Evidence: does KLIP detect and localise what the prior has not seen, better than simple signals?

- :mod:`~klip_med.eval.metrics`: dataset-level and localisation AUROC / AUPRC, per-patient bootstrap.
- :mod:`~klip_med.eval.baselines`: baseline maps from the same sampling run.
- :mod:`~klip_med.eval.runner`: :func:`run_benchmark` (resumable per-slice cache, results files).
- :mod:`~klip_med.eval.summary`, :mod:`~klip_med.eval.results`, :mod:`~klip_med.eval.cache`: the pieces
  between cached slices and ``results.json`` / ``results.md`` / ROC figures.
- :mod:`~klip_med.eval.nulls`: the null-calibrated rows ``klip_z[...]``.

The command is ``klip-med eval`` (:mod:`klip_med.cli.eval`).
"""

import importlib

# Loaded on first use (PEP 562), so that ``klip-med --help`` does not import torch through here.
_WHERE = {
    "BASELINES": "names", "DEFAULT_WINDOWS": "names",
    "BaselineSettings": "baselines", "MethodMap": "baselines", "compute_baselines": "baselines",
    "Interval": "metrics", "Localisation": "metrics", "auprc": "metrics", "auroc": "metrics",
    "dataset_level": "metrics", "lesion_blocks": "metrics", "localisation": "metrics",
    "localisation_level": "metrics", "paired_difference": "metrics", "patient_bootstrap": "metrics",
    "run_benchmark": "runner", 
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"klip_med.eval.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'klip_med.eval' has no attribute {name!r}")


__all__ = [
    "BASELINES",
    "BaselineSettings",
    "DEFAULT_WINDOWS",
    "Interval",
    "Localisation",
    "MethodMap",
    "auprc",
    "auroc",
    "compute_baselines",
    "dataset_level",
    "lesion_blocks",
    "localisation",
    "localisation_level",
    "paired_difference",
    "patient_bootstrap",
    "run_benchmark",
]
