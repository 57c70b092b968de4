"""Which slices a benchmark uses: in-distribution (ID) and out-of-distribution (OOD), per patient.

Selection rule (deterministic, documented in every results.json):

1. Patients: the items of the chosen split in manifest order; with ``max_patients`` set, that many
   evenly spaced through the list (the centres of equal strata; the manifests are ordered by
   institution, so this spreads them). "Evenly spaced" means the same for slices below.
2. Slices are mapped to the prior's units with the prior's intensity rule (MR: scale set by the
   whole volume, as in training). A slice is eligible when its body fraction (pixels above -0.9 in
   prior units) is at least ``min_body_fraction`` (0.3).
3. ``lesions="real"`` (manifests with a lesion mask): OOD = eligible slices whose mask has at least
   ``min_lesion_pixels`` pixels (30 at 128 x 128, scaled with the image area); ID = eligible
   slices with an empty mask; slices with a smaller abnormality are left out. Per patient, up to
   ``ceil(max_slices / 2)`` OOD slices evenly spaced through its OOD slices, each matched to the
   not-yet-used ID slice of the same patient with the closest body fraction (ties: closest slice
   index): the matched ID slice has the same brain size, so brain size alone cannot separate the
   classes. A patient with no OOD slice contributes ``ceil(max_slices / 2)`` evenly spaced ID slices.
4. ``lesions="inserted"`` (e.g. CT without masks): per patient ``ceil(max_slices / 2)`` eligible
   slices, evenly spaced; each gives a matched pair: the slice itself (ID) and the same slice with
   one synthetic lesion (OOD; :func:`klip_med.data.lesions.insert_ct_lesion` for CT,
   :func:`~klip_med.data.lesions.insert_flair_lesion` for MR) of at least ``min_lesion_pixels``
   pixels, drawn with a ``numpy`` Generator seeded by the run seed and the slice.
   ``lesions="auto"`` is ``real`` when the manifest has a mask key, else ``inserted``.
5. CT lesion design (``ct_lesions``):

   - ``"soft-tissue"`` (the default): a hypodense metastasis-like lesion. Its contrast is uniform
     in :data:`~klip_med.data.lesions.CT_HYPODENSE_RANGE_HU` (-80 to -40 HU). It lies wholly in
     solid soft tissue (:func:`~klip_med.data.lesions.soft_tissue_mask_ct`: liver, spleen, kidney,
     muscle). Its diameter is uniform between the 30-pixel minimum and 30 mm, capped by the room
     the tissue leaves.
   - ``"body"`` (the first design; kept to reproduce its numbers): contrast of either sign,
     10-60 HU, anywhere in the body, bone included.
6. Shift kinds (``shift``, with ``lesions="inserted"``; one kind per run, never mixed with real
   lesions). The hosts are the eligible slices with an empty lesion mask (when the manifest has
   masks), ``ceil(max_slices / 2)`` per patient evenly spaced, each with its twin keyed
   ``file[i]+<shift>`` (the healthy twin ``file[i]`` is shared by every kind):

   - ``"bright"``: FLAIR hyperintense lesion (:func:`~klip_med.data.lesions.insert_flair_lesion`);
     CT hyperdense (+40 to +80 HU, :data:`~klip_med.data.lesions.CT_HYPERDENSE_RANGE_HU`) in soft tissue.
   - ``"hypo"``: FLAIR CSF-like cavity (:func:`~klip_med.data.lesions.insert_flair_cavity`, a resection
     cavity); CT hypodense in soft tissue (the ``soft-tissue`` design of rule 5).
   - ``"texture"``: iso-intense texture change (:func:`~klip_med.data.lesions.insert_texture`: zero mean
     change over the mask, std 8-15 % of the range / 25-50 HU), in the head / in soft tissue.
   - ``"star"``: the KLIP paper's star artefact (:func:`~klip_med.data.lesions.insert_star`), bright or
     dark at random (15-40 % of the range / 100-300 HU), 10-40 mm, in the head / body.
   - ``"metal"`` (CT only): a dense elliptical object (:func:`~klip_med.data.lesions.insert_metal`,
     2000-3000 HU, 3-10 mm but at least 2 pixels) in the body. In the prior's HU window it
     saturates; the streaks of a real implant are not simulated.

   Round kinds keep ``min_lesion_pixels``; a star and a metal object take their size range as is
   (their masks may be smaller).

The bootstrap unit is the manifest item's ``labels.patient`` (the item's file when absent); when a
split holds a single patient (L067), each item (a block of slices) is its own unit.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from klip_med.data.identity import manifest_key, slice_sha256
from klip_med.data.manifest import Manifest, ManifestItem
from klip_med.data.masks import body_fraction
from klip_med.errors import KLIPMedError

LESION_MODES = ("auto", "real", "inserted")
CT_LESION_DESIGNS = ("soft-tissue", "body")
SHIFT_KINDS = ("bright", "hypo", "texture", "star", "metal")
"""Inserted shift kinds (rule 6)."""


@dataclass(frozen=True)
class EvalSlice:
    """One benchmark image.

    Attributes:
        key: unique name, ``file[index]`` (``+lesion`` for an inserted-lesion twin).
        patient: the bootstrap unit.
        label: 1 = OOD, 0 = ID.
        image: (H, W) float32 ground truth in prior units.
        lesion: (H, W) bool lesion mask (all False for ID).
        seed_key: the string per-slice randomness derives from (shared by a matched pair).
        info: slice index, body fraction, lesion pixels, matching, inserted lesion parameters.
    """

    key: str
    patient: str
    label: int
    image: np.ndarray
    lesion: np.ndarray
    seed_key: str
    info: dict = field(default_factory=dict)


def slice_seed(seed: int, key: str) -> int:
    """A per-slice seed from the run seed and a slice name (stable across runs and subsets)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**62)


def _evenly(n_have: int, n_want: int) -> list[int]:
    """``n_want`` of ``range(n_have)`` at the centres of equal strata (one pick: the middle one)."""
    if n_want <= 0 or n_have <= 0:
        return []
    if n_want >= n_have:
        return list(range(n_have))
    return [int((k + 0.5) * n_have / n_want) for k in range(n_want)]


def _units(items: list[ManifestItem]) -> list[str]:
    names = [str(item.labels.get("patient", item.relative)) for item in items]
    if len(items) > 1 and len(set(names)) == 1:
        return [f"{n}/{item.labels.get('block', item.relative + str(k))}" for k, (n, item) in
                enumerate(zip(names, items, strict=True))]
    return names


def _to_prior_units(volume: np.ndarray, prior) -> tuple[np.ndarray, float | None]:
    rule = prior.config.intensity
    scale = rule.mr_scale(volume) if rule.kind == "mr-percentile" else None
    return rule.to_model(volume, scale), scale


def _spacing(data, item: ManifestItem, pixel_spacing_mm: float | None) -> tuple[float, float]:
    if pixel_spacing_mm is not None:
        return (float(pixel_spacing_mm), float(pixel_spacing_mm))
    if "pixel_spacing_mm" in data:
        sp = np.asarray(data["pixel_spacing_mm"], dtype=float).reshape(-1)
        return (float(sp[0]), float(sp[-1]))
    raise KLIPMedError(
        f"{item.relative}: pixel spacing: expected a 'pixel_spacing_mm' array in the file or the "
        "pixel_spacing_mm argument (needed to insert lesions), found neither"
    )


def select_slices(manifest: Manifest, split: str, prior, max_patients: int | None = None,
                  max_slices_per_patient: int = 10, lesions: str = "auto", seed: int = 0,
                  min_body_fraction: float = 0.3, min_lesion_pixels: int = 30,
                  pixel_spacing_mm: float | None = None, ct_lesions: str = "soft-tissue",
                  shift: str | None = None) -> list[EvalSlice]:
    """The benchmark's slices by the rule in the module docstring.

    Args:
        manifest: a read manifest. split: ``dev`` or ``test`` (``train`` is refused).
        prior: the prior (its ``config.intensity`` and ``image_shape`` set units and grid).
        max_patients: patients to use (None: all). max_slices_per_patient: images per patient
            (OOD + ID together).
        lesions: ``auto``, ``real`` or ``inserted``.
        min_lesion_pixels: at 128 x 128; scaled with the image area.
        pixel_spacing_mm: spacing for inserted lesions when the files do not record one.
        ct_lesions: the inserted CT lesion design, ``soft-tissue`` or ``body`` (rule 5).
        shift: an inserted shift kind of :data:`SHIFT_KINDS` (rule 6; needs ``lesions="inserted"``),
            or None (rules 3-5).
    """
    if split not in ("dev", "test"):
        raise KLIPMedError(f"split: expected 'dev' or 'test' (held-out patients), found {split!r}")
    if lesions not in LESION_MODES:
        raise KLIPMedError(f"lesions: expected one of {list(LESION_MODES)}, found {lesions!r}")
    if ct_lesions not in CT_LESION_DESIGNS:
        raise KLIPMedError(f"ct_lesions: expected one of {list(CT_LESION_DESIGNS)}, found {ct_lesions!r}")
    if not isinstance(max_slices_per_patient, int) or max_slices_per_patient < 1:
        raise KLIPMedError(f"max_slices_per_patient: expected a positive integer, found {max_slices_per_patient!r}")
    if max_patients is not None and (not isinstance(max_patients, int) or max_patients < 1):
        raise KLIPMedError(f"max_patients: expected a positive integer or None, found {max_patients!r}")
    mode = ("real" if manifest.mask_key else "inserted") if lesions == "auto" else lesions
    if shift is not None:
        if shift not in SHIFT_KINDS:
            raise KLIPMedError(f"shift: expected one of {list(SHIFT_KINDS)}, found {shift!r}")
        if mode != "inserted":
            raise KLIPMedError(f"shift: expected lesions='inserted' (a shift kind is inserted into healthy slices), "
                               f"found lesions={lesions!r}")
        if shift == "metal" and manifest.modality != "CT":
            raise KLIPMedError(f"shift: 'metal' expected a CT manifest, found modality {manifest.modality!r}")
    if mode == "real" and not manifest.mask_key:
        raise KLIPMedError(f"{manifest.source}: lesions='real': expected a manifest with a mask_key, found none "
                           "(use lesions='inserted')")
    items = list(manifest.split(split))
    if not items:
        raise KLIPMedError(f"{manifest.source}: split {split!r}: expected at least one item, found none")
    units = _units(items)
    picks = _evenly(len(items), max_patients or len(items))
    grid = tuple(prior.image_shape[-2:])
    per_half = math.ceil(max_slices_per_patient / 2)
    chosen: list[EvalSlice] = []
    for p in picks:
        item, unit = items[p], units[p]
        with np.load(item.path) as data:
            if manifest.array_key not in data:
                raise KLIPMedError(f"{item.path}: expected an array {manifest.array_key!r}, found {sorted(data)}")
            volume = data[manifest.array_key].astype(np.float32)
            with_masks = mode == "real" or (shift is not None and manifest.mask_key)
            masks = data[manifest.mask_key].astype(bool) if with_masks else None
            spacing = _spacing(data, item, pixel_spacing_mm) if mode == "inserted" else None
        if tuple(volume.shape[-2:]) != grid:
            raise KLIPMedError(f"{item.relative}: expected slices of {grid} (the prior's grid), found {volume.shape[-2:]}")
        model, scale = _to_prior_units(volume, prior)
        min_px = max(1, int(round(min_lesion_pixels * grid[0] * grid[1] / (128 * 128))))
        indices = item.slice_indices(volume.shape[0])
        body = {i: body_fraction(model[i]) for i in indices}
        eligible = [i for i in indices if body[i] >= min_body_fraction]
        if mode == "real":
            picked = _real(item, unit, model, masks, eligible, body, per_half, min_px)
        elif shift is not None:
            hosts = [i for i in eligible if masks is None or not masks[i].any()]
            picked = _shifted(item, unit, volume, model, scale, hosts, body, per_half, min_px, spacing,
                              manifest.modality, prior, seed, shift)
        else:
            picked = _inserted(item, unit, volume, model, scale, eligible, body, per_half, min_px,
                               spacing, manifest.modality, prior, seed, ct_lesions)
        for s in picked:  # the source slice's identity (an inserted twin shares its slice's)
            s.info["source"] = {"key": manifest_key(manifest.name, item.relative, s.info["slice"]),
                                "sha256": slice_sha256(volume[s.info["slice"]])}
        chosen += picked
    if not chosen:
        raise KLIPMedError(f"{manifest.source}: split {split!r}: expected eligible slices (body fraction >= "
                           f"{min_body_fraction}), found none")
    return chosen


def _real(item, unit, model, masks, eligible, body, per_half, min_px) -> list[EvalSlice]:
    size = {i: int(masks[i].sum()) for i in eligible}
    ood = [i for i in eligible if size[i] >= min_px]
    healthy = [i for i in eligible if size[i] == 0]
    out = []
    ood_pick = [ood[k] for k in _evenly(len(ood), per_half)]
    used: set[int] = set()
    for i in ood_pick:
        out.append(_slice(item, unit, 1, model[i], masks[i], i, body[i], lesion_pixels=size[i]))
        free = [j for j in healthy if j not in used]
        if free:
            j = min(free, key=lambda j: (abs(body[j] - body[i]), abs(j - i), j))
            used.add(j)
            out.append(_slice(item, unit, 0, model[j], masks[j], j, body[j], matched_to=f"{item.relative}[{i}]"))
    if not ood_pick:
        for k in _evenly(len(healthy), per_half):
            j = healthy[k]
            out.append(_slice(item, unit, 0, model[j], masks[j], j, body[j]))
    return out


def _slice(item, unit, label, image, mask, index, body_fraction, **info) -> EvalSlice:
    key = f"{item.relative}[{index}]"
    return EvalSlice(key, unit, int(label), np.ascontiguousarray(image, dtype=np.float32),
                     np.asarray(mask, dtype=bool).copy(), key,
                     {"file": item.relative, "slice": int(index), "body_fraction": round(body_fraction, 4), **info})


def _inserted(item, unit, volume, model, scale, eligible, body, per_half, min_px, spacing, modality, prior,
              seed, ct_lesions="soft-tissue") -> list[EvalSlice]:
    from klip_med.data.lesions import (
        CT_DIAMETER_RANGE_MM,
        CT_HYPODENSE_RANGE_HU,
        FLAIR_DIAMETER_RANGE_MM,
        insert_ct_lesion,
        insert_flair_lesion,
        largest_inscribed_radius_mm,
        soft_tissue_mask_ct,
    )

    rule = prior.config.intensity
    out = []
    for k in _evenly(len(eligible), per_half):
        i = eligible[k]
        key = f"{item.relative}[{i}]"
        rng = np.random.default_rng(slice_seed(seed, key + "+lesion"))
        lo, hi = CT_DIAMETER_RANGE_MM if modality == "CT" else FLAIR_DIAMETER_RANGE_MM
        spread = 1.15 if modality == "CT" else 1.15 * 1.6  # irregularity (and FLAIR oedema) margins
        largest = 0.95 * min(volume.shape[-2] * spacing[0], volume.shape[-1] * spacing[1]) / spread
        d_min = 2.0 * math.sqrt(min_px / math.pi) * max(spacing) * 1.05
        low = max(lo, d_min, 2.02 * max(spacing))  # insert_* needs >= 2 pixels across
        high = min(max(hi, low * 1.2), largest)
        region = None
        if modality == "CT" and ct_lesions == "soft-tissue":
            region = soft_tissue_mask_ct(volume[i], spacing)
            room = 2.0 * largest_inscribed_radius_mm(region, spacing) / spread
            high = min(high, 0.99 * room)
        if low > high:
            where = "soft tissue" if region is not None else "an image"
            raise KLIPMedError(f"{key}: expected room for a lesion of >= {min_px} pixels ({low:.1f} mm), found "
                               f"{where} of {volume.shape[-2:]} pixels at {spacing} mm that holds {high:.1f} mm")
        diameter = float(rng.uniform(low, high))
        if region is not None:
            contrast = float(rng.uniform(*CT_HYPODENSE_RANGE_HU))
            ins = insert_ct_lesion(volume[i], spacing, rng, diameter_mm=diameter, contrast_hu=contrast,
                                   placement_mask=region)
        elif modality == "CT":
            ins = insert_ct_lesion(volume[i], spacing, rng, diameter_mm=diameter)
        else:
            ins = insert_flair_lesion(volume[i], spacing, rng, diameter_mm=diameter,
                                      intensity_range=(0.0, float(max(volume.max(), 1e-6))))
        lesioned = rule.to_model(ins.image, scale)
        healthy = _slice(item, unit, 0, model[i], np.zeros_like(ins.mask), i, body[i])
        info = {"file": item.relative, "slice": int(i), "body_fraction": round(body[i], 4),
                "lesion_pixels": int(ins.mask.sum()), "matched_to": key,
                "inserted": {"kind": ins.lesion.kind, "design": ct_lesions if modality == "CT" else "flair",
                             "diameter_mm": round(ins.lesion.diameter_mm, 3),
                             "contrast": round(float(ins.lesion.contrast), 4),
                             "centre": [round(float(c), 2) for c in ins.lesion.centre]}}
        out.append(healthy)
        out.append(EvalSlice(key + "+lesion", unit, 1, lesioned.astype(np.float32), ins.mask.astype(bool), key, info))
    return out


def _shifted(item, unit, volume, model, scale, hosts, body, per_half, min_px, spacing, modality, prior, seed,
             shift) -> list[EvalSlice]:
    """Rule 6: matched pairs of a healthy host slice and its twin with one inserted ``shift``."""
    from klip_med.data.shifts import insert_shift

    rule = prior.config.intensity
    out = []
    for k in _evenly(len(hosts), per_half):
        i = hosts[k]
        key = f"{item.relative}[{i}]"
        rng = np.random.default_rng(slice_seed(seed, f"{key}+{shift}"))
        ins = insert_shift(volume[i], spacing, rng, modality, shift, min_px,
                           intensity_range=(0.0, float(max(volume.max(), 1e-6))))
        lesioned = rule.to_model(ins.image, scale)
        params = {n: round(float(v), 4) for n, v in ins.lesion.params.items()}
        info = {"file": item.relative, "slice": int(i), "body_fraction": round(body[i], 4),
                "lesion_pixels": int(ins.mask.sum()), "matched_to": key,
                "inserted": {"kind": ins.lesion.kind, "shift": shift, "diameter_mm": round(ins.lesion.diameter_mm, 3),
                             "contrast": round(float(ins.lesion.contrast), 4),
                             "centre": [round(float(c), 2) for c in ins.lesion.centre], "params": params}}
        out.append(_slice(item, unit, 0, model[i], np.zeros_like(ins.mask), i, body[i]))
        out.append(EvalSlice(f"{key}+{shift}", unit, 1, lesioned.astype(np.float32), ins.mask.astype(bool), key, info))
    return out
