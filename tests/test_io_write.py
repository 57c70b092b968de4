"""Every DICOM object we write: read back with pydicom / highdicom with the same values, frames
tied to source instances by SOPInstanceUID, validated by dciodvfy, written atomically, inputs
untouched."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from matplotlib.image import imread
from pydicom.data import get_testdata_file

from klip_med.errors import KLIPMedError
from klip_med.io import (
    NATS_PER_PIXEL,
    Volume,
    fuse_heatmap,
    read_dicom_series,
    read_nifti,
    read_parametric_map,
    read_seg,
    seg_label_values,
    validate,
    write_derived_series,
    write_figure,
    write_fractional_seg,
    write_nifti,
    write_ood_seg,
    write_parametric_map,
    write_secondary_captures,
    write_seg,
)
from klip_med.io.dicom.secondary_capture import display_window

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
SOURCES = {
    "ct_small": Path(get_testdata_file("CT_small.dcm")),
    "mr_small": Path(get_testdata_file("MR_small.dcm")),
    "ct_series": CT5N,
}


def _files(p: Path) -> list[Path]:
    return sorted(p.iterdir()) if p.is_dir() else [p]


def _digest(p: Path) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in _files(p)}


def assert_dciodvfy_clean(path: Path, source: Path | None = None) -> None:
    """No dciodvfy errors; warnings only those accepted in klip_med.io.dicom.validate (with reasons).

    Warnings accepted as inherited from the source header must also be reported for the source.
    """
    if not validate.dciodvfy_available():
        pytest.skip("dciodvfy (dicom3tools) not installed")
    report = validate.run_dciodvfy(path)
    assert validate.unexplained(report) == [], f"{path.name}: {validate.unexplained(report)}"
    if source is not None:
        src_warnings = validate.run_dciodvfy(_files(source)[0]).warnings
        for warning in report.warnings:
            if any(re.search(p, warning) for p in validate.OWN_WARNINGS):
                continue
            for pattern in validate.INHERITED_WARNINGS:
                if re.search(pattern, warning):
                    assert any(re.search(pattern, w) for w in src_warnings), (
                        f"{path.name}: {warning!r} is not inherited from {source.name}"
                    )


@pytest.fixture(params=list(SOURCES))
def source(request) -> tuple[Path, Volume]:
    path = SOURCES[request.param]
    return path, read_dicom_series(path)


def _klip_map(vol: Volume) -> np.ndarray:
    """A map with a hot square in each slice (nats per pixel)."""
    z, h, w = vol.shape
    m = np.random.default_rng(0).random(vol.shape).astype(np.float32) * 0.1
    m[:, h // 4 : h // 2, w // 4 : w // 2] += 2.0
    return m


def test_derived_series(source, tmp_path):
    path, vol = source
    before = _digest(path)
    recon = vol.pixels + np.linspace(-3.3, 3.3, vol.pixels.size, dtype=np.float32).reshape(vol.shape)
    paths = write_derived_series(vol, recon, tmp_path / "recon")
    assert len(paths) == vol.shape[0]
    back = read_dicom_series(tmp_path / "recon")
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)
    slope = float(back.datasets[0].get("RescaleSlope", 1.0))
    np.testing.assert_allclose(back.pixels, recon, atol=0.5 * slope + 1e-4)
    uids = set()
    for k, ds in enumerate(back.datasets):
        src = vol.datasets[k]
        assert ds.SOPClassUID == src.SOPClassUID and ds.Modality == src.Modality
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        uids.add(ds.SeriesInstanceUID)
    assert len(uids) == 1
    for p in paths:
        assert_dciodvfy_clean(p, path)
    assert _digest(path) == before


def test_parametric_map_nats_per_pixel(source, tmp_path):
    path, vol = source
    klip = _klip_map(vol)
    out = write_parametric_map(vol, klip, tmp_path / "klip_pm.dcm")
    np.testing.assert_allclose(read_parametric_map(out, vol), klip, rtol=2e-7)
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == hd.UID("1.2.840.10008.5.1.4.1.1.30")  # Parametric Map Storage
    assert ds.FrameOfReferenceUID == vol.frame_of_reference_uid
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == (NATS_PER_PIXEL.value, "UCUM")
    # stored = nats / scale, scale = the top of the display range (99.5th percentile): 0..1 spans the
    # colour scale of viewers that ignore the mapping (OHIF); the slope gives nats back
    scale = float(np.percentile(klip.astype(np.float32), 99.5))
    assert float(rwvm.RealWorldValueSlope) == pytest.approx(scale, rel=1e-6)
    assert float(rwvm.RealWorldValueIntercept) == 0.0
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == pytest.approx((0.5, 1.0))
    slice_of = {uid: k for k, uid in enumerate(vol.sop_instance_uids)}
    frames = ds.pixel_array.reshape(-1, *vol.shape[1:])
    seen = set()
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):  # each frame names its source
        k = slice_of[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   vol.slice_positions()[k], atol=1e-4)
        np.testing.assert_allclose(frames[i] * scale, klip[k], rtol=2e-7)
        seen.add(k)
    assert seen == set(range(vol.shape[0]))
    # frames run along cross(row, column), the slice order of a cornerstone3D volume: OHIF 3.13 lays
    # frame i into slice i whatever the frame's source reference says
    iop = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    along = [float(np.dot(np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float), np.cross(iop[:3], iop[3:])))
             for f in ds.PerFrameFunctionalGroupsSequence]
    assert along == sorted(along)
    assert_dciodvfy_clean(out, path)


def test_binary_and_fractional_seg(source, tmp_path):
    path, vol = source
    klip = _klip_map(vol)
    out = write_ood_seg(vol, klip, 1.0, tmp_path / "ood_seg.dcm")
    labels, names = read_seg(out, vol)
    np.testing.assert_array_equal(labels, (klip >= 1.0).astype(np.uint16))
    assert names == {1: "OOD"}
    assert_dciodvfy_clean(out, path)
    multi = np.zeros(vol.shape, np.int32)
    multi[:, :4, :4], multi[:, -4:, -3:] = 7, 42
    out = write_seg(vol, multi, tmp_path / "labels_seg.dcm", names={7: "seven", 42: "answer"})
    labels, names = read_seg(out, vol)
    lut = {0: 0, **seg_label_values(multi)}
    np.testing.assert_array_equal(np.vectorize(lut.get)(labels), multi)
    assert names == {1: "seven", 2: "answer"}
    assert_dciodvfy_clean(out, path)
    fraction = np.clip(klip / 2.5, 0, 1)
    out = write_fractional_seg(vol, fraction, tmp_path / "frac_seg.dcm")
    back, _ = read_seg(out, vol)
    np.testing.assert_allclose(back, fraction, atol=0.5 / 255 + 1e-6)
    assert_dciodvfy_clean(out, path)


def test_secondary_capture_fuses_heat_on_source(source, tmp_path):
    path, vol = source
    klip = _klip_map(vol)
    paths = write_secondary_captures(vol, klip, tmp_path / "sc", heat_range=(0.0, 2.0))
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == vol.sop_instance_uids[k]
        assert ds.StudyInstanceUID == vol.datasets[k].StudyInstanceUID
        expected = fuse_heatmap(vol.pixels[k], klip[k], window=display_window(vol.datasets[k], vol.pixels[k]),
                                heat_range=(0.0, 2.0))
        np.testing.assert_array_equal(ds.pixel_array, expected)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], vol.spacing[1:], atol=1e-6)
        assert_dciodvfy_clean(p, path)


def test_frames_follow_source_instances_not_index(tmp_path):
    vol = read_dicom_series(CT5N)
    mask = np.zeros(vol.shape, bool)
    mask[1, 2:5, 3:9] = True
    mask[4, 10:, :2] = True
    out = write_seg(vol, mask, tmp_path / "seg.dcm")
    # the same slices listed in reverse order (a negative slice step): values follow the UIDs
    rev_affine = vol.affine.copy()
    rev_affine[:3, 3] = vol.affine[:3, 3] + 4 * vol.affine[:3, 2]
    rev_affine[:3, 2] = -vol.affine[:3, 2]
    reversed_vol = Volume(vol.pixels[::-1], rev_affine, vol.datasets[::-1])
    labels, _ = read_seg(out, reversed_vol)
    np.testing.assert_array_equal(labels.astype(bool), mask[::-1])
    pm = write_parametric_map(vol, mask.astype(np.float32), tmp_path / "pm.dcm")
    np.testing.assert_array_equal(read_parametric_map(pm, reversed_vol), mask[::-1].astype(np.float32))


def test_bad_arguments_raise_our_error(tmp_path):
    vol = read_dicom_series(CT5N)
    with pytest.raises(KLIPMedError, match=r"klip_map: expected shape \(5, 16, 16\).*found shape \(5, 8, 8\)"):
        write_parametric_map(vol, np.zeros((5, 8, 8)), tmp_path / "pm.dcm")
    nifti_vol = read_nifti(write_nifti(vol, tmp_path / "v.nii.gz"))
    with pytest.raises(KLIPMedError, match=r"source: expected a Volume read from DICOM"):
        write_seg(nifti_vol, np.ones(vol.shape, bool), tmp_path / "seg.dcm")
    with pytest.raises(KLIPMedError, match=r"threshold: expected a value reached by the map"):
        write_ood_seg(vol, np.zeros(vol.shape), 1.0, tmp_path / "seg.dcm")
    with pytest.raises(KLIPMedError, match=r"fraction: expected values in \[0, 1\]"):
        write_fractional_seg(vol, np.full(vol.shape, 2.0), tmp_path / "f.dcm")
    with pytest.raises(KLIPMedError, match=r"pixels: expected finite values"):
        write_derived_series(vol, np.full(vol.shape, np.nan), tmp_path / "r")
    with pytest.raises(KLIPMedError, match=r"expected an existing output folder"):
        write_seg(vol, np.ones(vol.shape, bool), tmp_path / "missing" / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists() and not (tmp_path / "pm.dcm").exists()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    vol = read_dicom_series(CT5N)
    (tmp_path / "seg.dcm").write_bytes(b"old")

    def broken(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a DICOM")
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", broken)
    with pytest.raises(OSError, match="disk full"):
        write_seg(vol, np.ones(vol.shape, bool), tmp_path / "seg.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]
    assert (tmp_path / "seg.dcm").read_bytes() == b"old"


def test_png_figure(tmp_path):
    vol = read_dicom_series(get_testdata_file("CT_small.dcm"))
    klip = _klip_map(vol)
    out = write_figure(tmp_path / "fig.png", vol.pixels[0], klip[0], recon_slice=vol.pixels[0] + 5,
                       mask=klip[0] > 1.0, spacing=vol.spacing[1:], title="CT_small")
    img = imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    with pytest.raises(KLIPMedError, match=r"path: expected a \.png file name"):
        write_figure(tmp_path / "fig.jpg", vol.pixels[0], klip[0])


def test_the_console_line_names_the_level_of_its_p_value():
    from klip_med.io.outputs import one_line

    block = {"slice": 0, "row": 8, "col": 16, "nats_per_pixel": 0.4, "null_z": 4.1, "block_p": 1e-4, "size": 8}
    one = {"score": {"max_nats_per_pixel": 0.4, "slice": 0}, "top_blocks": [block],
           "null": {"slice_p": [0.0036], "volume_p": 0.0065}}
    line = one_line(one)
    assert "slice p 0.0036 (healthy slices this extreme)" in line and "volume p" not in line
    many = {**one, "slices": [{}, {}, {}], "null": {"slice_p": [0.2, 0.0036, 0.5], "volume_p": 0.011}}
    assert "volume p 0.011 (healthy volumes this extreme)" in one_line(many)
    assert "slice p" not in one_line({**one, "null": {}}) and "volume p" not in one_line({**one, "null": {}})
