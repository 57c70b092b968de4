"""Build a data manifest from a user's own DICOM folders / NIfTI files (``klip-med manifest``).

The path from a folder of scans to ``klip-med train / calibrate / eval --manifest``:

1. :func:`find_series`: every image series under the inputs. DICOM files (folders are searched
   recursively) are grouped by SeriesInstanceUID; each ``.nii`` / ``.nii.gz`` file is one series.
   Files that are not DICOM Part 10 are skipped and counted; DICOMDIR and objects without pixel
   data are skipped; localizer (scout) series and derived objects (SEG, RTSTRUCT, SR, ...) are skipped and named. The patient is the DICOM
   PatientID, for NIfTI the file stem (``patient_from="auto"``); for anonymised data without a
   PatientID: ``"input"`` (the name of the INPUT folder / file it was found under: one input per
   patient), ``"parent"`` (the folder holding the series' files or the NIfTI file) or ``"study"``
   (DICOM StudyInstanceUID; NIfTI: file stem).
2. :func:`assign_splits`: patients to train / dev / test by fractions, with a seeded permutation of
   the sorted patient ids (deterministic); every split with a positive fraction gets a patient.
3. :func:`build_manifest`: each series is read with the project's readers
   (:func:`~klip_med.io.dicom.read.read_dicom_series`, :func:`~klip_med.io.inputs.read_input`:
   HU for CT after RescaleSlope / Intercept), resampled in plane to the working grid
   (:func:`~klip_med.io.resample.working_grid`, the same resampling ``klip-med run`` uses) and
   written to ``<data_root>/<name>/<patient>_<series>.npz`` with arrays ``hu`` (CT) or ``image``
   (MR): float32 ``(S, H, W)`` physical units; ``pixel_spacing_mm``: float64 ``(2,)`` (row, column)
   mm on the working grid; ``z_mm``: float64 ``(S,)`` slice positions along the normal (mm);
   ``affine``: float64 ``(4, 4)`` voxel (column, row, slice) -> LPS mm of the working grid.
   The npz bytes are deterministic (fixed zip timestamps), so the same inputs give the same
   files, checksums and manifest. Files are written atomically; inputs are only read.

This module lives in ``pipeline`` (not ``data``) because it composes ``io`` (readers, resampling)
with ``data`` (the manifest schema, and the pure split / file-name / npz helpers of
:mod:`klip_med.data.build`), and ``data`` imports nothing of ours.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from klip_med._atomic import atomic_path
from klip_med.data.build import (
    ARRAY_KEYS,
    CREATED_BY,
    DEFAULT_FRACTIONS,
    DEFAULT_LICENCE,
    SPACING_KEY,
    assign_splits,
    npz_bytes,
    parse_fractions,
    safe_name,
)
from klip_med.data.manifest import SCHEMA, SPLITS, VERSION, Manifest, read_manifest
from klip_med.errors import KLIPMedError, expect
from klip_med.io.dicom.read import read_dicom_series
from klip_med.io.inputs import read_input
from klip_med.io.resample import working_grid
from klip_med.io.volume import Volume

PATIENT_FROM = ("auto", "input", "parent", "study")
"""Where the patient id comes from (module docstring, step 1)."""
_NIFTI = (".nii", ".nii.gz")
_DICOMDIR = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class SeriesRef:
    """One series to convert: the DICOM files of one SeriesInstanceUID, or one NIfTI file.

    Attributes:
        kind: ``"dicom"`` or ``"nifti"``.
        files: the files (DICOM: every file of the series, sorted; NIfTI: the one file).
        patient: patient id (DICOM PatientID; NIfTI: file stem or parent folder name).
        series_uid: SeriesInstanceUID (``""`` for NIfTI or an anonymised series without one).
        series_number: SeriesNumber as text (``""`` when absent).
        description: SeriesDescription (DICOM) or the file name (NIfTI).
        modality: ``"CT"``, ``"MR"``, or None (NIfTI: not recorded in the file).
        source: the folder holding the files (DICOM) or the file (NIfTI), for the labels.
    """

    kind: str
    files: tuple[Path, ...]
    patient: str
    series_uid: str
    series_number: str
    description: str
    modality: str | None
    source: str


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_manifest` wrote: the manifest (read back and checked), counts per split
    (``{split: {"patients", "series", "slices"}}``), the npz files and notes on skipped inputs."""

    manifest: Manifest
    counts: dict[str, dict[str, int]]
    files: tuple[Path, ...]
    notes: tuple[str, ...] = field(default=())


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI)


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem


def _nifti_ref(path: Path, root: Path, patient_from: str) -> SeriesRef:
    stem = _stem(path)
    patient = {"parent": path.resolve().parent.name, "input": _stem(root.resolve())}.get(patient_from, stem)
    return SeriesRef("nifti", (path,), patient, "", "", path.name, None, str(path))


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    """The header (pixel data deferred), or None for a file that is not DICOM Part 10."""
    try:
        return pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError:
        return None
    except Exception as exc:  # truncated / garbled headers raise many types inside pydicom
        raise KLIPMedError(f"{path}: expected a readable DICOM file, found {type(exc).__name__}: {exc}") from exc


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def find_series(inputs: Sequence[str | os.PathLike[str]], *, patient_from: str = "auto") -> tuple[
        list[SeriesRef], list[str]]:
    """Every image series under ``inputs`` (DICOM folders / files, NIfTI files / folders of them).

    Returns:
        ``(series, notes)``: series sorted by (patient, series number, UID, file); notes on what
        was skipped (non-DICOM files, localizers).

    Raises:
        KLIPMedError: a missing input, an input with no image series, an unreadable DICOM file,
            a series without PatientID or with several, a modality other than CT / MR.
    """
    expect(patient_from in PATIENT_FROM, "--patient-from", f"one of {list(PATIENT_FROM)}", patient_from)
    expect(len(inputs) > 0, "inputs", "at least one DICOM folder or NIfTI file", "none")
    refs: list[SeriesRef] = []
    groups: dict[str, list[tuple[Path, pydicom.Dataset, Path]]] = {}
    seen: set[Path] = set()
    notes: list[str] = []
    for given in inputs:
        root = Path(given)
        expect(root.exists(), str(root), "an existing DICOM folder, DICOM file or .nii / .nii.gz file", "no such path")
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
        found, skipped, repeated = 0, 0, 0
        for path in files:
            if path.resolve() in seen:
                repeated += 1
                continue
            seen.add(path.resolve())
            if _is_nifti(path):
                refs.append(_nifti_ref(path, root, patient_from))
                found += 1
                continue
            ds = _dicom_header(path)
            if ds is None:
                skipped += 1
                continue
            meta_class = _text(getattr(ds, "file_meta", pydicom.Dataset()), "MediaStorageSOPClassUID")
            if meta_class == _DICOMDIR or "PixelData" not in ds:
                continue
            key = _text(ds, "SeriesInstanceUID") or f"<no uid> {path.parent} {_text(ds, 'SeriesDescription')}"
            groups.setdefault(key, []).append((path, ds, root))
            found += 1
        if skipped:
            notes.append(f"{root}: skipped {skipped} file(s) that are not DICOM Part 10")
        expect(found > 0 or repeated > 0, str(root), "a DICOM image series (files with pixel data) or a .nii / .nii.gz file",
               f"none among {len(files)} file(s)" if root.is_dir() else "a file that is neither")
    for items in groups.values():
        ref = _dicom_ref(items, patient_from)
        if isinstance(ref, str):
            notes.append(f"{items[0][0].parent}: skipped {ref} series {_text(items[0][1], 'SeriesDescription')!r} "
                         f"({len(items)} file(s))")
        else:
            refs.append(ref)
    refs.sort(key=lambda r: (r.patient, int(r.series_number) if r.series_number.isdigit() else math.inf,
                             r.series_uid, str(r.files[0])))
    return refs, notes


DERIVED_MODALITIES = ("SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "PR", "SR", "KO", "REG", "RWV", "PLAN")
"""Objects that travel with image series in an export but hold no image to train on: skipped, named."""


def _patient(path: Path, ds: pydicom.Dataset, root: Path, patient_from: str) -> str:
    if patient_from == "input":
        return _stem(root.resolve())
    if patient_from == "parent":
        return path.resolve().parent.name
    return _text(ds, "StudyInstanceUID" if patient_from == "study" else "PatientID")


def _dicom_ref(items: list[tuple[Path, pydicom.Dataset, Path]], patient_from: str) -> SeriesRef | str:
    """The series of ``items`` (``(file, header, input)`` of one SeriesInstanceUID), or what was skipped:
    ``"localizer"`` or a derived object's modality (a SEG / RTSTRUCT / SR ... of a TCIA-style export)."""
    path, ds, _ = items[0]
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "localizer"
    modality = _text(ds, "Modality")
    if modality in DERIVED_MODALITIES:
        return f"derived ({modality})"
    expect(modality in ARRAY_KEYS, f"{path}: attribute Modality", "CT or MR images", repr(modality))
    patients = sorted({_patient(p, d, r, patient_from) for p, d, r in items})
    what = {"auto": "attribute PatientID", "study": "attribute StudyInstanceUID"}.get(patient_from, "folder name")
    expect(patients != [""], f"{path}: {what}",
           "a patient id (patients decide the train / dev / test split; for anonymised data pass "
           "--patient-from input (one INPUT folder per patient), parent or study)", "empty or absent")
    expect(len(patients) == 1, f"{path.parent}: {what}", "one patient per series",
           f"{len(patients)}: {patients[:4]}")
    files = tuple(sorted(p for p, _, _ in items))
    folder = os.path.commonpath([str(p.parent) for p in files])
    return SeriesRef("dicom", files, patients[0], _text(ds, "SeriesInstanceUID"), _text(ds, "SeriesNumber"),
                     _text(ds, "SeriesDescription"), modality, folder)


def prior_grid(name_or_folder: str) -> tuple[int, str]:
    """``(image_size, modality)`` from a shipped prior name or a prior folder's ``config.json``
    (the weights are not loaded)."""
    from klip_med.priors.config import PriorConfig
    from klip_med.priors.diffusion import CONFIG_FILE
    from klip_med.priors.registry import resolve_prior_path

    path = resolve_prior_path(name_or_folder)
    config = PriorConfig.read((path if path.is_dir() else path.parent) / CONFIG_FILE)
    return int(config.image_size), str(config.modality)


def _read_volume(ref: SeriesRef) -> Volume:
    if ref.kind == "nifti":
        return read_input(ref.files[0]).volume
    return read_dicom_series(list(ref.files), derive_missing_uids=True)


def series_arrays(ref: SeriesRef, modality: str, size: int) -> dict[str, np.ndarray]:
    """The npz arrays of one series on the ``size x size`` working grid (module docstring)."""
    volume = working_grid(_read_volume(ref), (size, size))
    _, dr, dc = volume.spacing
    normal = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
    return {ARRAY_KEYS[modality]: volume.pixels.astype(np.float32),
            SPACING_KEY: np.array([dr, dc], dtype=np.float64),
            "z_mm": volume.slice_positions() @ normal,
            "affine": volume.affine}


def _file_names(refs: Sequence[SeriesRef]) -> list[str]:
    """``<patient>_<series number>`` (``<patient>_<stem>`` for NIfTI), with an 8-hex hash of the
    UID / file added wherever that is not unique."""
    def tag(r: SeriesRef) -> str:
        return safe_name(r.series_number) if r.kind == "dicom" and r.series_number else (
            safe_name(_stem(r.files[0])) if r.kind == "nifti" else "series")
    bases = [f"{safe_name(r.patient)}_{tag(r)}" for r in refs]
    names = []
    for base, r in zip(bases, refs, strict=True):
        if bases.count(base) > 1:
            ident = r.series_uid or str(r.files[0])
            base = f"{base}_{hashlib.sha256(ident.encode()).hexdigest()[:8]}"
        names.append(f"{base}.npz")
    expect(len(set(names)) == len(names), "inputs", "distinct series",
           f"the same series twice: {sorted(n for n in names if names.count(n) > 1)[:3]}")
    return names


def _modality(refs: Sequence[SeriesRef], modality: str | None) -> str:
    found = {r.modality for r in refs if r.modality is not None}
    if modality is not None:
        expect(modality in ARRAY_KEYS, "--modality", "CT or MR", repr(modality))
        for r in refs:
            expect(r.modality in (None, modality), str(r.files[0]), f"{modality} images (--modality {modality})",
                   f"Modality {r.modality} (series {r.description!r} in {r.source})")
        return modality
    nifti = [r.source for r in refs if r.kind == "nifti"]
    expect(not nifti, "--modality", "CT or MR for NIfTI input (a NIfTI file does not record it)",
           f"none given for {nifti[:2]}")
    examples = {m: next(r.source for r in refs if r.modality == m) for m in sorted(found)}
    expect(len(found) == 1, "inputs", "series of one modality (pass --modality to name the one expected)",
           "mixed modalities: " + "; ".join(f"{m} (e.g. {s})" for m, s in examples.items()))
    return found.pop()


def _grid(size: int | None, prior: str | None, modality: str) -> int:
    """The working grid side: ``size``, else the prior's ``image_size``, else 128."""
    if prior is not None:
        prior_size, prior_modality = prior_grid(prior)
        expect(prior_modality == modality, "--prior", f"a {modality} prior for {modality} data",
               f"{prior!r}, a {prior_modality} prior")
        expect(size in (None, prior_size), "--size", f"{prior_size} (the grid of --prior {prior}) or no --size",
               repr(size))
        size = prior_size
    size = 128 if size is None else size
    expect(isinstance(size, int) and not isinstance(size, bool) and size >= 8, "--size",
           "an integer >= 8 (pixels)", repr(size))
    return size


def _description(inputs: Sequence[str], n_series: int, n_patients: int, modality: str, size: int,
                 fractions: Sequence[float], seed: int) -> str:
    units = "HU" if modality == "CT" else "MR signal (as stored)"
    return (f"Built by klip-med manifest from {', '.join(inputs)}: {n_series} series of {n_patients} patient{'s' if n_patients != 1 else ''}, "
            f"{modality}, resampled in plane to {size}x{size} (the working grid; pixel_spacing_mm in each file), "
            f"float32 {units}. Splits by patient, train/dev/test fractions "
            f"{'/'.join(f'{f:g}' for f in fractions)}, seed {seed}.")


def build_manifest(inputs: Sequence[str | os.PathLike[str]], data_root: str | os.PathLike[str], name: str,
                   out: str | os.PathLike[str], *, modality: str | None = None, size: int | None = None,
                   prior: str | None = None,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0, licence: str = DEFAULT_LICENCE,
                   patient_from: str = "auto", overwrite: bool = False,
                   log: Callable[[str], None] | None = None) -> BuildResult:
    """Convert the series under ``inputs`` into npz files under ``data_root/name`` and write the
    manifest ``out`` (steps in the module docstring); the manifest is read back with
    :func:`~klip_med.data.manifest.read_manifest` (checksums verified) before returning.

    Args:
        inputs: DICOM folders / files and NIfTI files (folders may hold several series, nested).
        data_root: folder the manifest's paths are relative to (created if missing).
        name: manifest name, also the sub-folder of ``data_root`` for the npz files.
        out: the manifest JSON to write; an existing file is refused unless ``overwrite``.
        modality: ``CT`` or ``MR``; default the DICOM Modality (required for NIfTI-only input).
        size: in-plane working grid, pixels (``size x size``), >= 8; default the prior's, else 128.
        prior: a shipped prior name or prior folder: its grid size (and modality, checked).
        fractions: train / dev / test fractions of patients. seed: the split permutation's seed.
        licence: the manifest's licence text. patient_from: one of :data:`PATIENT_FROM`.
        overwrite: replace an existing ``out`` and npz files whose bytes differ.
        log: called with one line per series written (e.g. ``print``).

    Raises:
        KLIPMedError: a bad argument or input; the message names it, what was expected and found.
    """
    out_path = Path(out)
    expect(overwrite or not out_path.exists(), "--out", "a new manifest file (or --overwrite)",
           f"an existing file {str(out_path)!r}")
    expect(not out_path.is_dir(), "--out", "a file path for the manifest JSON", f"a folder {str(out_path)!r}")
    expect(isinstance(name, str) and safe_name(name) == name and not name.startswith("."), "--name",
           "a folder-safe name of letters, digits, '.', '_' or '-' (e.g. my-ct)", repr(name))
    fractions = parse_fractions(fractions)
    refs, notes = find_series(inputs, patient_from=patient_from)
    modality = _modality(refs, modality)
    size = _grid(size, prior, modality)
    splits = assign_splits([r.patient for r in refs], fractions, seed)
    root = Path(data_root).expanduser()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    items, written = [], []
    counts = {s: {"patients": 0, "series": 0, "slices": 0} for s in SPLITS}
    for k, (ref, file_name) in enumerate(zip(refs, _file_names(refs), strict=True)):
        arrays = series_arrays(ref, modality, size)
        data = npz_bytes(arrays)
        digest = hashlib.sha256(data).hexdigest()
        target = folder / file_name
        if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == digest):
            expect(overwrite or not target.exists(), str(target), "a new file (or --overwrite)",
                   "an existing file with other contents")
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
        written.append(target)
        split = splits[ref.patient]
        n_slices = int(arrays[ARRAY_KEYS[modality]].shape[0])
        counts[split]["series"] += 1
        counts[split]["slices"] += n_slices
        items.append({"file": f"{name}/{file_name}", "sha256": digest, "split": split, "slices": "all",
                      "labels": {"patient": ref.patient, "series_uid": ref.series_uid,
                                 "series_description": ref.description, "source": ref.source}})
        if log is not None:
            log(f"[{k + 1}/{len(refs)}] {ref.source}: {n_slices} slices -> {target} ({split})")
    for split in SPLITS:
        counts[split]["patients"] = len({p for p, s in splits.items() if s == split})
    manifest = {
        "schema": SCHEMA, "version": VERSION, "name": name, "modality": modality,
        "description": _description([str(i) for i in inputs], len(refs), len(splits), modality, size, fractions, seed),
        "licence": licence, "array_key": ARRAY_KEYS[modality], "spacing_key": SPACING_KEY,
        "created_by": CREATED_BY, "items": items,
    }
    if notes:
        manifest["notes"] = list(notes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return BuildResult(read_manifest(out_path, root), counts, tuple(written), tuple(notes))
