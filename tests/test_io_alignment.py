"""Overlays land on the source pixels: SEGs written on real and synthetic (oblique) series are read
back by highdicom (by SOPInstanceUID) and by dcmqi's segimage2itkimage, and compared voxel for
voxel with the label map / patient-space shape they came from, using geometry computed here
directly from each file's ImagePositionPatient / ImageOrientationPatient / PixelSpacing."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from klip_med.io import (
    ANATOMY_CATEGORY,
    ANATOMY_TYPE,
    read_dicom_series,
    read_nifti,
    resample_to,
    write_nifti,
    write_seg,
)

DATA = Path(os.environ.get("KLIP_MED_DATA_ROOT", Path(__file__).parents[2] / "shared" / "data"))
CT_DIR = DATA / "dicom" / "ct_abdomen_20slices"
CT_LABELS = DATA / "dicom" / "ct_abdomen_20slices_organ_labels.nii.gz"
MR_DIR = DATA / "dicom" / "mr_brain_t1_oblique_24slices"
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared data absent: {path}")


def _dcmqi() -> str:
    exe = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    if not Path(exe).exists():
        pytest.skip("dcmqi (pip install dcmqi) not installed")
    return exe


# --- independent geometry: straight from each file's header ----------------------------------


def _raw_headers(files: list[Path]) -> list[pydicom.Dataset]:
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ds.SOPInstanceUID = ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID
        out.append(ds)
    return out


def _locate(points_lps: np.ndarray, headers: list[pydicom.Dataset]):
    """(file index, row, column) of LPS points lying on pixel centres of the files."""
    ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    x, y = iop[:3], iop[3:]
    dr, dc = (float(v) for v in headers[0].PixelSpacing)
    normal = np.cross(x, y)
    dist = points_lps @ normal
    plane = ipp @ normal
    order = np.argsort(plane)
    pos = np.clip(np.searchsorted(plane[order], dist), 1, len(plane) - 1)
    near = np.where(np.abs(dist - plane[order][pos - 1]) <= np.abs(dist - plane[order][pos]), pos - 1, pos)
    k = order[near]
    assert np.max(np.abs(dist - plane[k])) < 1e-3, "points off the source planes"
    rel = points_lps - ipp[k]
    r, c = rel @ y / dr, rel @ x / dc
    assert np.max(np.abs(r - np.round(r))) < 1e-3 and np.max(np.abs(c - np.round(c))) < 1e-3
    return k, np.round(r).astype(int), np.round(c).astype(int)


def _pixel_centres(headers: list[pydicom.Dataset]) -> np.ndarray:
    """(n_files, H, W, 3) LPS centres of every pixel of every file."""
    out = []
    for ds in headers:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        out.append(ipp + r[..., None] * dr * iop[3:] + c[..., None] * dc * iop[:3])
    return np.stack(out)


def _seg_by_file(seg_path: Path, headers: list[pydicom.Dataset]) -> np.ndarray:
    """(n_files, H, W) segment numbers read by highdicom for each file's SOPInstanceUID."""
    seg = hd.seg.segread(seg_path)
    return seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in headers], combine_segments=True)


def _dcmqi_voxels(seg_path: Path, out: Path) -> dict[str, np.ndarray]:
    """{segment label: (N, 3) LPS centres of its voxels} as dcmqi reads the SEG."""
    out.mkdir()
    done = subprocess.run([_dcmqi(), "--inputDICOM", str(seg_path), "--outputDirectory", str(out),
                           "-t", "nifti", "--mergeSegments"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    meta = json.loads((out / "meta.json").read_text())
    result = {}
    for i, group in enumerate(meta["segmentAttributes"], start=1):  # one label image per group
        img = nib.load(out / f"{i}.nii.gz")
        labels = np.asarray(img.dataobj)
        for attrs in group:
            ijk = np.argwhere(labels == attrs["labelID"])
            ras = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
            result[attrs["SegmentLabel"]] = ras * np.array([-1.0, -1.0, 1.0])
    return result


def _check_sphere_round_trip(files: list[Path], tmp_path: Path, radius: float) -> None:
    vol = read_dicom_series(files, derive_missing_uids=True)
    headers = _raw_headers(files)
    centres = _pixel_centres(headers)
    centre = centres[len(files) // 2, headers[0].Rows // 2, headers[0].Columns // 3]
    inside = np.linalg.norm(centres - centre, axis=-1) <= radius  # per file, independent of vol
    mask = np.zeros(vol.shape, bool)
    slice_of = {uid: k for k, uid in enumerate(vol.sop_instance_uids)}
    for f, ds in enumerate(headers):
        mask[slice_of[ds.SOPInstanceUID]] = inside[f]
    seg_path = write_seg(vol, mask, tmp_path / "sphere_seg.dcm", names={1: "sphere"})
    np.testing.assert_array_equal(_seg_by_file(seg_path, headers).astype(bool), inside)
    points = _dcmqi_voxels(seg_path, tmp_path / "dcmqi")["sphere"]
    assert len(points) == int(inside.sum())
    k, r, c = _locate(points, headers)
    assert inside[k, r, c].all() and np.linalg.norm(points - centre, axis=1).max() <= radius + 1e-3


def _oblique_series(folder: Path, n: int = 6, step: float = 3.0) -> list[Path]:
    """CT_small restacked as an oblique series (rotated orientation, slices along the normal)."""
    folder.mkdir()
    a, b, g = np.radians([25.0, -35.0, 15.0])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(g), -np.sin(g)], [0, np.sin(g), np.cos(g)]])
    rot = rz @ ry @ rx
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series, frame, origin = generate_uid(), generate_uid(), np.array([-40.0, 12.0, 30.0])
    paths = []
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in np.r_[rot[:, 0], rot[:, 1]]]
        ds.ImagePositionPatient = [f"{v:.10f}" for v in origin + k * step * rot[:, 2]]
        ds.save_as(folder / f"{(k * 5) % n}.dcm", enforce_file_format=True)
        paths.append(folder / f"{(k * 5) % n}.dcm")
    return paths


def test_sphere_on_synthetic_oblique_series(tmp_path):
    files = _oblique_series(tmp_path / "obl")
    _check_sphere_round_trip(files, tmp_path, radius=8.0)


def test_bundled_ct_series_labels_via_nifti(tmp_path):
    """pydicom's 5-slice CT: a label map stored as NIfTI (rows and slices reversed, as many tools
    write them) goes back onto the series and into a SEG that dcmqi reads onto the same voxels."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    files = sorted(folder.iterdir())
    vol = read_dicom_series(files)
    labels = np.zeros(vol.shape, np.int16)
    labels[0, 2:6, 3:7], labels[2, 9:, :5], labels[4, 0, 0] = 3, 8, 3
    flipped = vol.affine.copy()
    flipped[:3, 1] = -vol.affine[:3, 1]
    flipped[:3, 2] = -vol.affine[:3, 2]
    flipped[:3, 3] = vol.affine[:3, 3] + 15 * vol.affine[:3, 1] + 4 * vol.affine[:3, 2]
    from klip_med.io import Volume

    nii = write_nifti(Volume(labels[::-1, ::-1].astype(np.float32), flipped), tmp_path / "lab.nii.gz",
                      dtype=np.int16)
    on_grid = resample_to(read_nifti(nii), vol, order=0).astype(np.int16)
    np.testing.assert_array_equal(on_grid, labels)
    seg_path = write_seg(vol, on_grid, tmp_path / "seg.dcm", names={3: "three", 8: "eight"})
    headers = _raw_headers(files)
    by_dcmqi = _dcmqi_voxels(seg_path, tmp_path / "dcmqi")
    slice_of = {uid: k for k, uid in enumerate(vol.sop_instance_uids)}
    for name, value in (("three", 3), ("eight", 8)):
        k, r, c = _locate(by_dcmqi[name], headers)
        z = np.array([slice_of[headers[i].SOPInstanceUID] for i in k])
        assert (labels[z, r, c] == value).all() and len(z) == int((labels == value).sum())


def test_ct_abdomen_organ_labels_land_on_source_pixels(tmp_path):
    _need(CT_DIR)
    _need(CT_LABELS)
    files = sorted(CT_DIR.iterdir())
    vol = read_dicom_series(CT_DIR, derive_missing_uids=True)
    nii = nib.load(CT_LABELS)
    data = np.asarray(nii.dataobj).astype(np.int32)
    on_grid = resample_to(read_nifti(CT_LABELS), vol, order=0).astype(np.int32)
    values = [int(v) for v in np.unique(data) if v]
    seg_path = write_seg(vol, on_grid, tmp_path / "organs_seg.dcm", names={v: f"organ {v}" for v in values},
                         category=ANATOMY_CATEGORY, property_type=ANATOMY_TYPE)
    # 1. every labelled NIfTI voxel (and a fifth of the others), placed in patient space by the NIfTI affine, finds its label in the
    #    SEG frame of the source file whose plane holds it (geometry from the raw headers)
    headers = _raw_headers(files)
    labelled = data != 0
    labelled.flat[::5] = True  # every labelled voxel, and every 5th voxel of the rest
    ijk = np.argwhere(labelled)
    lps = (ijk @ nii.affine[:3, :3].T + nii.affine[:3, 3]) * np.array([-1.0, -1.0, 1.0])
    k, r, c = _locate(lps, headers)
    seg_numbers = _seg_by_file(seg_path, headers)
    number_to_label = np.array([0, *values])
    np.testing.assert_array_equal(number_to_label[seg_numbers[k, r, c]], data[tuple(ijk.T)])
    # 2. dcmqi reads each organ back onto the voxels the NIfTI labelled
    by_dcmqi = _dcmqi_voxels(seg_path, tmp_path / "dcmqi")
    inv = np.linalg.inv(nii.affine)
    for name, points in by_dcmqi.items():
        ras = points * np.array([-1.0, -1.0, 1.0])
        idx = np.round(ras @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        value = int(name.split()[-1])
        assert (data[tuple(idx.T)] == value).all() and len(idx) == int((data == value).sum())
    # 3. and the organs sit on tissue in the CT, not on air (a flipped overlay would not)
    assert np.mean(vol.pixels[on_grid > 0] < -500) < 0.05


def test_mr_oblique_sphere_round_trip(tmp_path):
    _need(MR_DIR)
    _check_sphere_round_trip(sorted(MR_DIR.iterdir()), tmp_path, radius=20.0)
