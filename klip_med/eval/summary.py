"""From cached slices to every method's metrics: block pooling, image scores, AUROCs, intervals.

For each method and image: the per-pixel map is pooled into ``block_size`` blocks (block mean,
i.e. density per pixel; :func:`klip_med.score.pool_blocks`), the blocks inside the body mask
(at least half their pixels in the mask derived from the posterior mean, the same for every
method) are kept, the image score is the mean of the top-``k`` inside blocks. ``centrality`` is
defined on blocks directly; ``eigenscore_lambda1`` is EigenScore's own image score (the mean top
eigenvalue over noise levels) and ``diffguard_level_kl`` DiffGuard's (the KL between the level
distributions of the reconstruction and its guided re-generation), dataset-level only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from klip_med.calibration.scoring import inside_blocks
from klip_med.errors import KLIPMedError
from klip_med.eval.baselines import centrality_blocks
from klip_med.eval.cache import CachedSlice
from klip_med.eval.metrics import (
    dataset_level,
    fast_auroc,
    has_both_classes,
    interval_rule,
    lesion_blocks,
    localisation,
    localisation_level,
    paired_difference,
    patient_bootstrap,
    per_unit,
)
from klip_med.eval.names import BASELINES
from klip_med.score.blocks import BlockScores, image_score, pool_blocks

REFERENCES = ("posterior_std", "brightness")
"""Methods every other method is compared with (paired per-patient bootstrap differences)."""
NATIVE = {"eigenscore_lambda1": "eigenscore", "diffguard_level_kl": "diffguard"}
"""Image-level rows -> the baseline whose own image score (``native_score``) they report."""


def _topk(blocks: np.ndarray, inside: np.ndarray, k: int) -> float:
    t = torch.from_numpy(np.asarray(blocks, dtype=np.float32))
    scores = BlockScores(sums=t, densities=t, pixel_counts=torch.ones(t.shape, dtype=torch.int64),
                         block_size=(1, 1), partial=torch.zeros(t.shape, dtype=torch.bool))
    return image_score(scores, torch.from_numpy(inside), k=k).topk_mean


def method_names(entries: Sequence[CachedSlice]) -> list[str]:
    """Methods present in every entry, KLIP first, then the cache's order; plus the block-only /
    image-only ones."""
    if not entries:
        raise KLIPMedError("entries: expected at least one cached slice, found none")
    common = [n for n in entries[0].maps if all(n in e.maps for e in entries)]
    order = {name: k for k, name in enumerate(BASELINES)}  # baselines in table order, whenever each was computed
    others = sorted((n for n in common if not n.startswith("klip")), key=lambda n: order.get(n, len(order)))
    names = [n for n in common if n.startswith("klip")] + others
    if all("centrality" in e.meta.get("costs", {}) for e in entries):
        names.append("centrality")
    for row, base in NATIVE.items():
        if all(e.meta.get("costs", {}).get(base, {}).get("native_score") is not None for e in entries):
            names.append(row)
    return names


def block_maps(entry: CachedSlice, name: str, block_size: int) -> np.ndarray | None:
    """(gh, gw) block means of one method on one slice (None for image-only methods)."""
    if name == "centrality":
        return centrality_blocks(entry.lesion.shape, block_size)
    if name in NATIVE:
        return None
    return pool_blocks(torch.from_numpy(np.array(entry.maps[name], dtype=np.float32)), block_size).densities.numpy()


def _cost(entries: Sequence[CachedSlice], name: str) -> dict:
    sampling_nfe = [e.meta["sampling"]["nfe_per_image"] for e in entries]
    sampling_s = [e.meta["sampling"]["seconds"] for e in entries]
    base = NATIVE.get(name, name)
    costs = [e.meta.get("costs", {}).get(base, {}) for e in entries]
    extra_nfe = float(np.mean([c.get("nfe", 0) for c in costs]))
    extra_s = float(np.mean([c.get("seconds", 0.0) for c in costs]))
    needs_run = base not in ("brightness", "brightness_dev", "centrality")
    nfe = (float(np.mean(sampling_nfe)) if needs_run else 0.0) + extra_nfe
    seconds = (float(np.mean(sampling_s)) if needs_run else 0.0) + extra_s
    return {"nfe_per_image": int(round(nfe)), "seconds_per_image": round(seconds, 4),
            "extra_nfe_per_image": int(round(extra_nfe)), "extra_seconds_per_image": round(extra_s, 4),
            "uses_sampling_run": needs_run}


def summarise(entries: Sequence[CachedSlice], block_size: int = 8, top_k: int = 5, n_boot: int = 1000,
              seed: int = 0, references: Sequence[str] = REFERENCES) -> tuple[dict, dict]:
    """Metrics of every method over the cached slices.

    Returns:
        ``(methods, curves)``: methods maps a name to ``{"dataset", "localisation", "vs", "cost"}``
        (see :func:`klip_med.eval.metrics.dataset_level` / ``localisation_level``; ``vs[ref]`` holds
        paired bootstrap differences method - ref of dataset AUROC and per-image localisation AUROC);
        curves maps ``"dataset"`` / ``"localisation"`` to ``{name: (scores, labels)}`` for ROC figures
        (localisation: blocks inside the body of all OOD images pooled).
    """
    names = method_names(entries)
    labels = np.array([e.label for e in entries], dtype=np.int64)
    patients = [e.patient for e in entries]
    ood = [i for i, e in enumerate(entries) if e.label == 1]
    insides = [inside_blocks(e.body_mask, block_size) for e in entries]
    lesions = {i: lesion_blocks(entries[i].lesion, block_size) for i in ood}
    methods: dict[str, dict] = {}
    image_scores: dict[str, np.ndarray] = {}
    per_image_loc: dict[str, list] = {}
    curves: dict[str, dict] = {"dataset": {}, "localisation": {}}
    for name in names:
        blocks = [block_maps(e, name, block_size) for e in entries]
        if name in NATIVE:
            scores = np.array([e.meta["costs"][NATIVE[name]]["native_score"] for e in entries], dtype=np.float64)
        else:
            scores = np.array([_topk(b, ins, top_k) for b, ins in zip(blocks, insides, strict=True)])
        image_scores[name] = scores
        entry = {"dataset": dataset_level(scores, labels, patients, n_boot, seed), "localisation": None,
                 "cost": _cost(entries, name)}
        curves["dataset"][name] = (scores, labels)
        if blocks[0] is not None and ood:
            locs = [localisation(blocks[i], lesions[i], insides[i]) for i in ood]
            per_image_loc[name] = [loc.auroc for loc in locs]
            entry["localisation"] = localisation_level(locs, [patients[i] for i in ood], n_boot, seed)
            pooled_s = np.concatenate([blocks[i][insides[i]] for i in ood])
            pooled_y = np.concatenate([lesions[i][insides[i]] for i in ood]).astype(np.int64)
            curves["localisation"][name] = (pooled_s, pooled_y)
        methods[name] = entry
    for name, entry in methods.items():
        entry["vs"] = {}
        for ref in references:
            if ref not in methods or ref == name:
                continue
            vs = {"dataset_auroc": _paired_auroc(image_scores[name], image_scores[ref], labels, patients, n_boot, seed)}
            if name in per_image_loc and ref in per_image_loc:
                vs["localisation_auroc"] = paired_difference(per_image_loc[name], per_image_loc[ref],
                                                             [patients[i] for i in ood], n_boot, seed)
            entry["vs"][ref] = vs
    return methods, curves


def _paired_auroc(a: np.ndarray, b: np.ndarray, labels: np.ndarray, patients, n_boot: int, seed: int) -> dict:
    if not has_both_classes(labels):
        return {"mean": None, "ci": [None, None], "n": int(labels.size)}

    def diff(idx: np.ndarray) -> float:
        return fast_auroc(a[idx], labels[idx]) - fast_auroc(b[idx], labels[idx])

    reason = interval_rule(patients)
    if reason is not None:
        return {"mean": diff(np.arange(labels.size)), "ci": [None, None], "n": int(labels.size), "interval": reason,
                "per_patient": per_unit(diff, patients)}
    ci = patient_bootstrap(diff, patients, n_boot, seed)
    return {"mean": diff(np.arange(labels.size)), "ci": ci.as_list(), "n": int(labels.size), "interval": None}
