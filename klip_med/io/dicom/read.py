"""Read a DICOM image series into a :class:`~klip_med.io.volume.Volume`.

Files are grouped by SeriesInstanceUID, sorted along the slice normal (ImageOrientationPatient
row x column) by ImagePositionPatient, and checked for one orientation, pixel spacing, matrix
size and frame of reference, and for even slice spacing without shear (gantry tilt). The modality
LUT (RescaleSlope / RescaleIntercept, so Hounsfield units for CT) is applied. Compressed transfer
syntaxes decode through pydicom's pixel handlers (JPEG 2000 / JPEG-LS / RLE via the pylibjpeg
plugins). Files are never modified: repairs (UIDs taken from the file meta) happen in memory and
are listed in ``Volume.notes``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from klip_med.errors import KLIPMedError, expect
from klip_med.io.volume import Volume

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_ORIENTATION_TOL = 1e-4  # direction cosines
_SPACING_REL_TOL = 1e-3  # relative, pixel spacing
_SLICE_TOL_MM = 1e-2  # absolute floor for slice-spacing / shear checks (mm)
_SLICE_REL_TOL = 1e-2  # relative to the slice spacing


def _files(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        expect(path.exists(), "source", "an existing DICOM folder or file", str(path))
        if path.is_file():
            return [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        expect(bool(files), str(path), "a folder holding DICOM files", "an empty folder")
        return files
    files = [Path(p) for p in source]
    expect(bool(files), "source", "at least one DICOM file", "an empty list")
    for p in files:
        expect(p.is_file(), "source", "existing DICOM files", f"no file {p}")
    return files


def _read_header(path: Path) -> FileDataset:
    """dcmread plus a full parse of every element, so malformed values fail here, named."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise KLIPMedError(
            f"{path}: expected a DICOM Part 10 file (128-byte preamble + 'DICM'), found none ({exc})"
        ) from exc
    except Exception as exc:  # truncated or garbled files raise many types inside pydicom
        raise KLIPMedError(
            f"{path}: expected a readable DICOM file, found {type(exc).__name__}: {exc}"
        ) from exc
    try:
        meta = getattr(ds, "file_meta", None)
        for elem in [*(meta.iterall() if meta is not None else []), *ds.iterall()]:
            if elem.tag != 0x7FE00010:
                _ = elem.value
    except Exception as exc:
        raise KLIPMedError(
            f"{path}: expected well-formed DICOM attributes, found {type(exc).__name__}: {exc}"
        ) from exc
    return ds


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword, None)
    if value is None:
        raw: list[object] = []
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raw = [value]
    else:
        raw = list(value)
    try:
        values = [float(v) for v in raw]  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise KLIPMedError(f"{path}: attribute {keyword}: expected {n} numbers, found {value!r}") from exc
    expect(
        len(values) == n and bool(np.all(np.isfinite(values))),
        f"{path}: attribute {keyword}",
        f"{n} finite numbers (missing geometry?)",
        "absent" if value is None else repr(value),
    )
    return np.asarray(values, dtype=np.float64)


def _int(ds: Dataset, keyword: str, path: Path) -> int:
    value = ds.get(keyword, None)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise KLIPMedError(f"{path}: attribute {keyword}: expected an integer, found {value!r}") from exc


def _group(
    headers: list[tuple[Path, FileDataset]], series_uid: str | None
) -> list[tuple[Path, FileDataset]]:
    groups: dict[str, list[tuple[Path, FileDataset]]] = {}
    for path, ds in headers:
        groups.setdefault(_uid(ds, "SeriesInstanceUID"), []).append((path, ds))
    def describe() -> str:
        return "; ".join(
            f"{uid or '<empty>'} ({len(items)} files, {str(items[0][1].get('SeriesDescription', ''))!r},"
            f" e.g. {items[0][0].name})"
            for uid, items in groups.items()
        )
    if series_uid is not None:
        expect(series_uid in groups, "series_uid", f"one of the series found: {describe()}", series_uid)
        return groups[series_uid]
    expect(
        len(groups) == 1,
        "source",
        "files of one series (pass series_uid= to choose one)",
        f"{len(groups)} series mixed: {describe()}",
    )
    return next(iter(groups.values()))


def _repair_uids(
    items: list[tuple[Path, FileDataset]], derive_missing_uids: bool
) -> list[str]:
    notes: list[str] = []
    for path, ds in items:
        meta = getattr(ds, "file_meta", Dataset())
        for keyword, meta_keyword in (
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
            ("SOPClassUID", "MediaStorageSOPClassUID"),
        ):
            if not _uid(ds, keyword):
                expect(
                    bool(_uid(meta, meta_keyword)),
                    f"{path}: attribute {keyword}",
                    f"a UID (or {meta_keyword} in the file meta)",
                    "empty in both",
                )
                setattr(ds, keyword, _uid(meta, meta_keyword))
                notes.append(f"{keyword} taken from the file meta {meta_keyword}")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if _uid(ds, keyword):
                continue
            expect(
                derive_missing_uids and keyword != "FrameOfReferenceUID",
                f"{path}: attribute {keyword}",
                "a UID (pass derive_missing_uids=True to derive Study/Series UIDs for an "
                "anonymised series)" if keyword != "FrameOfReferenceUID" else "a UID",
                "empty or absent",
            )
            seed = [_uid(ds, "FrameOfReferenceUID"), keyword]
            if keyword == "SeriesInstanceUID":
                seed += [str(ds.get("SeriesDescription", "")), str(ds.get("SeriesTime", ""))]
            setattr(ds, keyword, generate_uid(entropy_srcs=seed))
            notes.append(f"{keyword} derived deterministically from the FrameOfReferenceUID")
    seen: dict[str, Path] = {}
    for path, ds in items:
        uid = _uid(ds, "SOPInstanceUID")
        expect(uid not in seen, f"{path}: attribute SOPInstanceUID", "a unique instance",
               f"the same UID as {seen.get(uid)}")
        seen[uid] = path
    return sorted(set(notes))


def _geometry(items: list[tuple[Path, FileDataset]]) -> tuple[list[int], np.ndarray, list[str]]:
    """Sort order and the voxel -> LPS affine; raises on inconsistent geometry."""
    notes: list[str] = []
    first_path, first = items[0]
    ref_iop = _floats(first, "ImageOrientationPatient", 6, first_path)
    ref_ps = _floats(first, "PixelSpacing", 2, first_path)
    ref_shape = (_int(first, "Rows", first_path), _int(first, "Columns", first_path))
    ref_for = _uid(first, "FrameOfReferenceUID")
    ref_modality = str(first.get("Modality", ""))
    x, y = ref_iop[:3], ref_iop[3:]
    expect(
        abs(np.linalg.norm(x) - 1) < 1e-3 and abs(np.linalg.norm(y) - 1) < 1e-3 and abs(x @ y) < 1e-3,
        f"{first_path}: attribute ImageOrientationPatient",
        "two orthogonal unit vectors",
        ref_iop.tolist(),
    )
    expect(bool(np.all(ref_ps > 0)), f"{first_path}: attribute PixelSpacing", "positive values",
           ref_ps.tolist())
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    normal = np.cross(x, y)
    positions = []
    for path, ds in items:
        frames = ds.get("NumberOfFrames", 1)
        expect(str(frames).strip() in ("", "1", "None"), f"{path}: attribute NumberOfFrames",
               "single-frame images (one slice per file)", frames)
        iop = _floats(ds, "ImageOrientationPatient", 6, path)
        expect(bool(np.all(np.abs(iop - ref_iop) < _ORIENTATION_TOL)),
               f"{path}: attribute ImageOrientationPatient",
               f"the series orientation {ref_iop.tolist()} (as in {first_path.name})", iop.tolist())
        ps = _floats(ds, "PixelSpacing", 2, path)
        expect(bool(np.all(np.abs(ps - ref_ps) <= _SPACING_REL_TOL * ref_ps)),
               f"{path}: attribute PixelSpacing", f"{ref_ps.tolist()} (as in {first_path.name})",
               ps.tolist())
        shape = (_int(ds, "Rows", path), _int(ds, "Columns", path))
        expect(shape == ref_shape, f"{path}: attributes Rows, Columns", f"{ref_shape}", shape)
        expect(_uid(ds, "FrameOfReferenceUID") == ref_for, f"{path}: attribute FrameOfReferenceUID",
               f"{ref_for} (as in {first_path.name})", _uid(ds, "FrameOfReferenceUID"))
        expect(str(ds.get("Modality", "")) == ref_modality, f"{path}: attribute Modality",
               ref_modality, str(ds.get("Modality", "")))
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))
    ipp = np.stack(positions)
    distance = ipp @ normal
    order = [int(i) for i in np.argsort(distance, kind="stable")]
    ipp, distance = ipp[order], distance[order]
    if len(items) == 1:
        thickness = first.get("SpacingBetweenSlices", None) or first.get("SliceThickness", None)
        try:
            spacing = float(thickness) if thickness is not None else 1.0
        except (TypeError, ValueError):
            spacing = 1.0
        if not spacing > 0:
            spacing = 1.0
        notes.append(f"single slice: slice step {spacing} mm from SpacingBetweenSlices/SliceThickness")
    else:
        steps = np.diff(distance)
        names = [items[i][0] for i in order]
        k = int(np.argmin(steps))
        expect(steps[k] > _SLICE_TOL_MM, f"{names[k + 1]}: attribute ImagePositionPatient",
               "a slice position different from every other slice",
               f"the same position as {names[k]} ({ipp[k].tolist()})")
        spacing = float((distance[-1] - distance[0]) / (len(items) - 1))
        tol = max(_SLICE_TOL_MM, _SLICE_REL_TOL * spacing)
        k = int(np.argmax(np.abs(steps - spacing)))
        expect(abs(steps[k] - spacing) <= tol, f"{names[k + 1]}: attribute ImagePositionPatient",
               f"even slice spacing of {spacing:.4f} mm along the normal (within {tol:.3g} mm)",
               f"a step of {steps[k]:.4f} mm from {names[k].name}")
        inplane = (ipp - ipp[0]) - np.outer(distance - distance[0], normal)
        k = int(np.argmax(np.linalg.norm(inplane, axis=1)))
        expect(float(np.linalg.norm(inplane[k])) <= tol, f"{names[k]}: attribute ImagePositionPatient",
               "slices stacked along the normal of ImageOrientationPatient (no shear / gantry tilt)",
               f"an in-plane offset of {np.linalg.norm(inplane[k]):.4f} mm")
    declared = first.get("SpacingBetweenSlices", None)
    try:
        declared_mm = abs(float(declared)) if declared not in (None, "") else None
    except (TypeError, ValueError):
        declared_mm = None
    if len(items) > 1 and declared_mm is not None and abs(declared_mm - spacing) > 1e-3 * spacing + 1e-3:
        notes.append(f"header SpacingBetweenSlices {declared_mm} mm ignored: positions give {spacing:.6g} mm")
    affine = np.eye(4)
    affine[:3, 0] = x * ref_ps[1]
    affine[:3, 1] = y * ref_ps[0]
    affine[:3, 2] = normal * spacing
    affine[:3, 3] = ipp[0]
    return order, affine, notes


def _pixels(path: Path, ds: FileDataset) -> np.ndarray:
    expect("PixelData" in ds, str(path), "an image with PixelData", "no PixelData")
    expect(_int(ds, "SamplesPerPixel", path) == 1, f"{path}: attribute SamplesPerPixel",
           "1 (grey-scale)", ds.get("SamplesPerPixel"))
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array
        values = apply_modality_lut(arr, ds)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # decoder plugins may raise non-Exception types (Rust panics)
        name = getattr(syntax, "name", syntax)
        raise KLIPMedError(
            f"{path}: expected pixel data decodable under transfer syntax {name} (JPEG 2000, "
            f"JPEG-LS and RLE need pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg, pylibjpeg-rle), "
            f"found {type(exc).__name__}: {exc}"
        ) from exc
    shape = (_int(ds, "Rows", path), _int(ds, "Columns", path))
    expect(values.shape == shape, f"{path}: PixelData", f"one {shape} frame", f"shape {values.shape}")
    values = np.asarray(values, dtype=np.float32)
    expect(bool(np.all(np.isfinite(values))), f"{path}: PixelData", "finite values", "NaN / Inf")
    return values


def read_dicom_series(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    series_uid: str | None = None,
    derive_missing_uids: bool = False,
) -> Volume:
    """Read one DICOM image series (a folder, searched recursively, a file, or a list of files).

    Args:
        source: folder, single file, or list of files. Every file must be DICOM; images without
            pixel data (DICOMDIR, SR, ...) are ignored.
        series_uid: the SeriesInstanceUID to read when the files hold several series.
        derive_missing_uids: for anonymised data with empty Study/Series Instance UIDs, derive
            them deterministically (in memory) instead of raising.

    Returns:
        :class:`Volume` with float32 ``(Z, H, W)`` pixels in modality units (HU for CT), an LPS
        affine, and the source datasets (header only) sorted along the slice normal.

    Raises:
        KLIPMedError: unreadable / non-DICOM files, mixed series, missing or inconsistent
            geometry, uneven spacing, undecodable pixel data; the message names the file.
    """
    files = _files(source)
    headers = []
    for path in files:
        ds = _read_header(path)
        meta_class = _uid(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
        if meta_class == MEDIA_STORAGE_DIRECTORY or "PixelData" not in ds:
            continue
        headers.append((path, ds))
    expect(bool(headers), str(source), "at least one DICOM image with pixel data", "none")
    items = _group(headers, series_uid)
    notes = _repair_uids(items, derive_missing_uids)
    order, affine, geo_notes = _geometry(items)
    items = [items[i] for i in order]
    slices = []
    for path, ds in items:
        slices.append(_pixels(path, ds))
        del ds.PixelData  # header-only copy kept; the file on disk is untouched
    return Volume(
        pixels=np.stack(slices),
        affine=affine,
        datasets=tuple(ds for _, ds in items),
        source=str(source) if isinstance(source, (str, os.PathLike)) else f"{len(files)} files",
        notes=tuple(notes + geo_notes),
    )
