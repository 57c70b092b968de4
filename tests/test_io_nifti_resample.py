"""NIfTI in/out with the LPS <-> RAS conversion, resampling between grids, slice batches, pooling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path
from pydicom.data import get_testdata_file

from klip_med.errors import KLIPMedError
from klip_med.io import (
    Volume,
    blocks_to_voxels,
    iter_slice_batches,
    map_slices,
    pool_volume_map,
    read_dicom_series,
    read_nifti,
    resample_inplane,
    resample_to,
    to_source_grid,
    working_grid,
    write_nifti,
)
from klip_med.score.blocks import pool_blocks


def test_read_nibabel_bundled_nifti_voxels_and_affine():
    path = data_path / "anatomical.nii"
    img = nib.load(path)
    vol = read_nifti(path)
    data = np.asarray(img.dataobj)
    assert vol.shape == data.shape[::-1] and vol.datasets is None
    np.testing.assert_array_equal(vol.pixels[3, 5, 7], data[7, 5, 3])  # pixels[k, j, i] = data[i, j, k]
    np.testing.assert_allclose(vol.affine_ras, img.affine)
    np.testing.assert_allclose(vol.affine[:2], -img.affine[:2])  # LPS = RAS with x, y flipped
    with pytest.raises(KLIPMedError, match=r"example4d\.nii\.gz: expected a 3D image"):
        read_nifti(data_path / "example4d.nii.gz")


def test_write_nifti_round_trip_with_source_affine(tmp_path):
    vol = read_dicom_series(get_testdata_file("CT_small.dcm"))
    out = write_nifti(vol, tmp_path / "ct.nii.gz")
    img = nib.load(out)
    assert img.shape == (128, 128, 1)
    np.testing.assert_allclose(img.affine, vol.affine_ras, atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    back = read_nifti(out)
    np.testing.assert_array_equal(back.pixels, vol.pixels)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    # an array on the volume's grid (e.g. a KLIP map) takes the reference's affine
    write_nifti(np.ones(vol.shape, np.float32), tmp_path / "map.nii", vol)
    np.testing.assert_allclose(nib.load(tmp_path / "map.nii").affine, vol.affine_ras, atol=1e-5)
    with pytest.raises(KLIPMedError, match=r"values: expected shape \(1, 128, 128\)"):
        write_nifti(np.ones((2, 128, 128)), tmp_path / "bad.nii", vol)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "map.nii"]  # no temp files


def test_inplane_resampling_kinds():
    x = torch.arange(16.0).reshape(1, 4, 4)
    down = resample_inplane(x, (2, 2))
    np.testing.assert_allclose(down[0], [[2.5, 4.5], [10.5, 12.5]])  # exact 2x2 block means
    dens = resample_inplane(x, (2, 2), kind="density")
    assert float(dens.sum()) == pytest.approx(float(x.sum()))  # nats are kept
    up = resample_inplane(dens, (4, 4), kind="density")
    assert float(up.sum()) == pytest.approx(float(x.sum()), rel=1e-6)
    labels = np.array([[[0, 0, 3, 3], [0, 0, 3, 3], [5, 5, 0, 0], [5, 5, 0, 0]]], dtype=np.int16)
    assert resample_inplane(labels, (2, 2), kind="label").tolist() == [[[0, 3], [5, 0]]]
    with pytest.raises(KLIPMedError, match=r"kind: expected one of"):
        resample_inplane(x, (2, 2), kind="cubic")


def test_working_grid_geometry_and_back():
    vol = read_dicom_series(get_testdata_file("CT_small.dcm"))
    work = working_grid(vol, (32, 32))
    assert work.shape == (1, 32, 32) and work.datasets is None
    # working pixel (0, 0) is the centre of source pixels (0..3, 0..3)
    centre = vol.voxel_to_patient(np.array([0.0, 1.5, 1.5]))
    np.testing.assert_allclose(work.voxel_to_patient(np.array([0, 0, 0])), centre, atol=1e-9)
    np.testing.assert_allclose(work.pixels[0, 0, 0], vol.pixels[0, :4, :4].mean(), rtol=1e-5)
    back = to_source_grid(work.pixels, vol)
    assert back.shape == vol.shape


def test_resample_to_flipped_grid_is_exact():
    rng = np.random.default_rng(0)
    ref = Volume(rng.integers(0, 5, (3, 4, 5)).astype(np.float32), np.diag([0.5, 0.7, 2.0, 1.0]))
    # the same voxels stored with rows and slices reversed (as the CT label NIfTI is)
    flipped = np.eye(4)
    flipped[:3, :3] = ref.affine[:3, :3] @ np.diag([1.0, -1.0, -1.0])
    flipped[:3, 3] = ref.affine[:3, 3] + ref.affine[:3, 1] * 3 + ref.affine[:3, 2] * 2
    moving = Volume(ref.pixels[::-1, ::-1, :].copy(), flipped)
    np.testing.assert_array_equal(resample_to(moving, ref, order=0), ref.pixels)


def test_map_slices_batches_and_kinds():
    rng = np.random.default_rng(1)
    vol = Volume(rng.random((5, 8, 8)).astype(np.float32), np.eye(4))
    batches = list(iter_slice_batches(vol, 2, (4, 4)))
    assert [(b.start, b.stop) for b in batches] == [(0, 2), (2, 4), (4, 5)]
    assert batches[0].images.shape == (2, 1, 4, 4) and batches[0].sop_instance_uids is None

    def fn(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"recon": x, "klip": torch.ones_like(x)}  # 1 nat per working pixel

    out = map_slices(vol, fn, batch_size=2, working_size=(4, 4), kinds={"klip": "density"})
    assert out["recon"].shape == (5, 8, 8)
    np.testing.assert_allclose(out["klip"].sum(axis=(1, 2)), 16.0, rtol=1e-6)  # 16 nats per slice
    whole = map_slices(vol, lambda x: x * 2, batch_size=5)
    np.testing.assert_allclose(whole["out"], 2 * vol.pixels, rtol=1e-6)


def test_pool_volume_map_uses_score_blocks():
    rng = np.random.default_rng(2)
    m = rng.random((5, 7, 9)).astype(np.float32)
    scores = pool_volume_map(m, (2, 3, 4))
    ref = pool_blocks(torch.from_numpy(m), (2, 3, 4), ndim=3)
    torch.testing.assert_close(scores.sums, ref.sums)
    assert scores.grid == (3, 3, 3)
    painted = blocks_to_voxels(scores, m.shape)
    assert painted.shape == m.shape
    np.testing.assert_allclose(painted[0, 0, 0], m[:2, :3, :4].mean(), rtol=1e-5)
    np.testing.assert_allclose(painted[4, 6, 8], m[4:, 6:, 8:].mean(), rtol=1e-5)  # partial block


def test_volume_select_and_point_mapping():
    rng = np.random.default_rng(3)
    affine = np.array([[0.0, 0.8, 0.0, 10.0], [0.6, 0.0, 0.0, -5.0], [0.0, 0.0, -2.0, 3.0], [0, 0, 0, 1]])
    vol = Volume(rng.random((6, 4, 5)).astype(np.float32), affine)
    idx = np.array([[2.0, 1.0, 3.0], [5.0, 3.0, 0.0]])
    np.testing.assert_allclose(vol.patient_to_voxel(vol.voxel_to_patient(idx)), idx, atol=1e-12)
    sub = vol.select([1, 3, 5])
    np.testing.assert_array_equal(sub.pixels, vol.pixels[[1, 3, 5]])
    np.testing.assert_allclose(sub.voxel_to_patient(np.array([2.0, 1.0, 3.0])),
                               vol.voxel_to_patient(np.array([5.0, 1.0, 3.0])))
    with pytest.raises(KLIPMedError, match=r"slices: expected increasing, evenly stepped indices"):
        vol.select([0, 1, 3])
    with pytest.raises(KLIPMedError, match=r"Volume.pixels: expected a \(Z, H, W\) array"):
        Volume(np.zeros((4, 5)), np.eye(4))
