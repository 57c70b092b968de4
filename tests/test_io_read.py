"""Reading DICOM series: geometry, sorting, rescale, compressed syntaxes, and bad input."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from klip_med.errors import KLIPMedError
from klip_med.io import read_dicom_series

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def _digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def make_series(folder: Path, n: int = 4, dz: float = 2.5, names=None, **overrides) -> list[Path]:
    """A synthetic CT series from CT_small.dcm: n slices dz mm apart, slice k offset by 10*k."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ipp = [float(v) for v in base.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + k * dz]
        ds.InstanceNumber = k + 1
        ds.PixelData = (base.pixel_array + 10 * k).astype(base.pixel_array.dtype).tobytes()
        for keyword, values in overrides.items():
            setattr(ds, keyword, values[k]) if values[k] is not None else delattr(ds, keyword)
        name = names[k] if names else f"s{(k * 7) % n:03d}.dcm"  # file names not in slice order
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths


def test_ct_small_single_slice_hu_and_geometry():
    path = get_testdata_file("CT_small.dcm")
    before = _digest([path])
    vol = read_dicom_series(path)
    ds = pydicom.dcmread(path)
    assert vol.shape == (1, 128, 128) and vol.pixels.dtype == np.float32
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.pixels[0], hu)
    np.testing.assert_allclose(vol.affine[:3, 3], [float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(vol.affine[:3, 0], [float(ds.PixelSpacing[1]), 0, 0])
    np.testing.assert_allclose(vol.affine[:3, 1], [0, float(ds.PixelSpacing[0]), 0])
    np.testing.assert_allclose(vol.affine_ras[:2, 3], -vol.affine[:2, 3])  # LPS -> RAS flips x, y
    assert vol.sop_instance_uids == (ds.SOPInstanceUID,) and "PixelData" not in vol.datasets[0]
    assert _digest([path]) == before


def test_synthetic_series_sorted_along_normal_not_by_name(tmp_path):
    paths = make_series(tmp_path / "s", n=5, dz=2.5)
    before = _digest(paths)
    vol = read_dicom_series(tmp_path / "s")
    assert vol.shape == (5, 128, 128)
    assert vol.spacing == pytest.approx((2.5, 0.661468, 0.661468))
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float32) - 1024
    for k in range(5):  # slice k carries +10*k: the z order, not the file-name order
        np.testing.assert_array_equal(vol.pixels[k], base + 10 * k)
    assert [int(ds.InstanceNumber) for ds in vol.datasets] == [1, 2, 3, 4, 5]
    shuffled = read_dicom_series([paths[3], paths[0], paths[4], paths[1], paths[2]])
    np.testing.assert_array_equal(shuffled.pixels, vol.pixels)
    assert _digest(paths) == before


def test_bundled_ct_series_matches_highdicom_geometry():
    import highdicom as hd

    vol = read_dicom_series(CT5N)
    assert vol.shape == (5, 16, 16) and vol.spacing[0] == pytest.approx(2.5)
    hv = hd.get_volume_from_series([pydicom.dcmread(p) for p in sorted(CT5N.iterdir())])
    # highdicom orders axes (slice, row, column); ours is (column, row, slice) in the affine.
    ours = vol.voxel_to_patient(np.array([[0, 0, 0], [4, 15, 15], [2, 3, 7]]))
    hv_idx = np.array([[0, 0, 0], [4, 15, 15], [2, 3, 7]], dtype=float)
    if np.dot(hv.affine[:3, 0], vol.affine[:3, 2]) < 0:
        hv_idx[:, 0] = 4 - hv_idx[:, 0]
    theirs = np.c_[hv_idx, np.ones(3)] @ hv.affine.T
    np.testing.assert_allclose(ours, theirs[:, :3], atol=1e-4)


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"],
)
def test_compressed_transfer_syntaxes_decode_like_uncompressed(name):
    ref = read_dicom_series(get_testdata_file("MR_small.dcm"))
    vol = read_dicom_series(get_testdata_file(name))
    np.testing.assert_array_equal(vol.pixels, ref.pixels)
    np.testing.assert_allclose(vol.affine, ref.affine)


def test_missing_uids_taken_from_meta_or_derived(tmp_path):
    paths = make_series(tmp_path / "s", n=3, SeriesInstanceUID=["", "", ""], SOPInstanceUID=["", "", ""])
    with pytest.raises(KLIPMedError, match=r"SeriesInstanceUID: expected a UID \(pass derive_missing_uids"):
        read_dicom_series(tmp_path / "s")
    vol = read_dicom_series(tmp_path / "s", derive_missing_uids=True)
    metas = {pydicom.dcmread(p).file_meta.MediaStorageSOPInstanceUID for p in paths}
    assert set(vol.sop_instance_uids) == metas
    again = read_dicom_series(tmp_path / "s", derive_missing_uids=True)
    assert again.datasets[0].SeriesInstanceUID == vol.datasets[0].SeriesInstanceUID  # deterministic
    assert any("file meta" in n for n in vol.notes)


# --- bad input: our exception, naming the file and the attribute --------------------------------


def test_truncated_file():
    path = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(KLIPMedError, match=r"MR_truncated\.dcm.*expected .*pixel data"):
        read_dicom_series(path)


def test_non_dicom_file_in_folder(tmp_path):
    make_series(tmp_path / "s", n=3)
    (tmp_path / "s" / "notes.txt").write_text("not an image")
    with pytest.raises(KLIPMedError, match=r"notes\.txt: expected a DICOM Part 10 file"):
        read_dicom_series(tmp_path / "s")


def test_two_series_mixed_and_choosing_one(tmp_path):
    make_series(tmp_path / "s", n=3)
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "s" / "mr.dcm")
    with pytest.raises(KLIPMedError, match=r"source: expected files of one series.*2 series mixed"):
        read_dicom_series(tmp_path / "s")
    uid = pydicom.dcmread(get_testdata_file("MR_small.dcm")).SeriesInstanceUID
    assert read_dicom_series(tmp_path / "s", series_uid=uid).shape == (1, 64, 64)
    with pytest.raises(KLIPMedError, match=r"series_uid: expected one of the series found"):
        read_dicom_series(tmp_path / "s", series_uid="1.2.3")


def test_missing_geometry(tmp_path):
    make_series(tmp_path / "s", n=3, ImagePositionPatient=[[0, 0, 0], None, [0, 0, 5]])
    with pytest.raises(KLIPMedError, match=r"s\d+\.dcm: attribute ImagePositionPatient: expected 3 finite"):
        read_dicom_series(tmp_path / "s")


def test_uneven_spacing(tmp_path):
    make_series(tmp_path / "s", n=4, ImagePositionPatient=[[0, 0, 0], [0, 0, 2], [0, 0, 4], [0, 0, 7]])
    with pytest.raises(KLIPMedError, match=r"ImagePositionPatient: expected even slice spacing"):
        read_dicom_series(tmp_path / "s")


def test_duplicate_position_and_shear(tmp_path):
    make_series(tmp_path / "d", n=3, ImagePositionPatient=[[0, 0, 0], [0, 0, 2], [0, 0, 2]])
    with pytest.raises(KLIPMedError, match=r"a slice position different from every other slice"):
        read_dicom_series(tmp_path / "d")
    make_series(tmp_path / "t", n=3, ImagePositionPatient=[[0, 0, 0], [0, 1, 2], [0, 2, 4]])
    with pytest.raises(KLIPMedError, match=r"no shear / gantry tilt"):
        read_dicom_series(tmp_path / "t")


def test_inconsistent_orientation_spacing_frame(tmp_path):
    tilted = [1, 0, 0, 0, 0.8, 0.6]
    make_series(tmp_path / "o", n=3, ImageOrientationPatient=[[1, 0, 0, 0, 1, 0], tilted, [1, 0, 0, 0, 1, 0]])
    with pytest.raises(KLIPMedError, match=r"attribute ImageOrientationPatient: expected the series orientation"):
        read_dicom_series(tmp_path / "o")
    make_series(tmp_path / "p", n=3, PixelSpacing=[[0.5, 0.5], [0.5, 0.5], [0.6, 0.5]])
    with pytest.raises(KLIPMedError, match=r"attribute PixelSpacing: expected \[0\.5, 0\.5\]"):
        read_dicom_series(tmp_path / "p")
    make_series(tmp_path / "f", n=3, FrameOfReferenceUID=["1.2.3", "1.2.3", "1.2.4"])
    with pytest.raises(KLIPMedError, match=r"attribute FrameOfReferenceUID: expected 1\.2\.3"):
        read_dicom_series(tmp_path / "f")


def test_unsupported_transfer_syntax(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    with pytest.raises(KLIPMedError, match=r"mpeg\.dcm: expected pixel data decodable under transfer syntax MPEG2"):
        read_dicom_series(tmp_path / "mpeg.dcm")


def test_nothing_to_read(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(KLIPMedError, match=r"expected a folder holding DICOM files, found an empty folder"):
        read_dicom_series(tmp_path / "e")
    with pytest.raises(KLIPMedError, match=r"source: expected an existing DICOM folder or file"):
        read_dicom_series(tmp_path / "missing")


_FUZZ_SOURCES = ["MR_small.dcm", "CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the garbage it reads
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    name=st.sampled_from(_FUZZ_SOURCES),
    region=st.sampled_from(["header", "pixels", "truncate"]),
)
def test_fuzzed_files_raise_only_our_error(tmp_path_factory, data, name, region):
    """Malformed headers, pixel data (raw and compressed) and truncation: either a volume or
    KLIPMedError, never another exception type."""
    raw = bytearray(Path(get_testdata_file(name)).read_bytes())
    if region == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        lo, hi = (132, min(1500, len(raw))) if region == "header" else (3 * len(raw) // 4, len(raw))
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(lo, hi - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "x.dcm"
    path.write_bytes(bytes(raw))
    try:
        vol = read_dicom_series(path)
    except KLIPMedError:
        return
    assert vol.pixels.ndim == 3 and np.all(np.isfinite(vol.pixels))
