"""Where null models live and which one a run uses.

A prior's folder (shipped or trained) may hold null models in ``<prior folder>/nulls/*.json``;
``"auto"`` takes the first whose conditions match the run (:mod:`klip_med.calibration.conditions`).
A file given by the user must match, or the run is refused naming each difference.
"""

from __future__ import annotations

from pathlib import Path

from klip_med.calibration.conditions import null_windows, run_conditions, weights_digest
from klip_med.calibration.null_model import NullModel
from klip_med.errors import KLIPMedError, expect

NULLS_DIR = "nulls"
"""Folder of a prior (shipped or trained) searched for null models by :func:`find_null`."""


def _prior_folder(prior_reference: str | Path) -> Path | None:
    from klip_med.priors.registry import resolve_prior_path

    try:
        folder = resolve_prior_path(prior_reference)
    except KLIPMedError:  # a prior built in memory: nothing shipped with it
        return None
    return folder if folder.is_dir() else folder.parent


def resolve_null(spec: str | Path | None, prior_reference: str | Path, prior, physics_spec: str,
                 settings) -> tuple[NullModel | None, list[int], str]:
    """The null model a run uses, and which of the run's windows it scores.

    Args:
        spec: ``"auto"`` (the first model in ``<prior folder>/nulls/*.json`` fitted under this run's
            prior weights, physics, sampler settings and block size, whose windows the run has),
            ``"none"`` / None (no null model), or a path from ``klip-med calibrate`` (it must match:
            :class:`KLIPMedError` naming each difference otherwise).
        prior_reference: a shipped prior name or a prior folder (as given to ``priors.load``).

    Returns:
        ``(model or None, window indices, description)``.
    """
    if spec is None or str(spec) == "none":
        return None, [], "none"
    digest = weights_digest(prior)
    if str(spec) == "auto":
        folder = _prior_folder(prior_reference)
        unreadable = []
        for path in sorted((folder / NULLS_DIR).glob("*.json")) if folder is not None else []:
            try:
                model = NullModel.load(path)
            except KLIPMedError:  # e.g. a model of an older file version: never applied
                unreadable.append(path.name)
                continue
            try:
                model.check_conditions(run_conditions(model, prior, physics_spec, settings, digest))
            except KLIPMedError:
                continue
            return model, null_windows(model, settings), f"shipped with the prior: {path.name}"
        skipped = f"; unreadable, refit them with `klip-med calibrate`: {', '.join(unreadable)}" if unreadable else ""
        return None, [], f"none applies (auto: no null model shipped for these physics and settings{skipped})"
    path = Path(spec)
    expect(path.is_file(), "--null", "a null model JSON file from `klip-med calibrate`, 'auto' or 'none'",
           f"no such file {str(path)!r}")
    model = NullModel.load(path)
    try:
        conditions = run_conditions(model, prior, physics_spec, settings, digest)
    except KLIPMedError as exc:
        raise KLIPMedError(f"--null {path}: {exc} (pass its windows with --window)") from None
    model.check_conditions(conditions, where=f"--null {path}")
    return model, null_windows(model, settings), str(path)
