"""Per-slice centring: a patient whose whole scan carries more KL than the calibration patients is not
flagged everywhere, and a lesion inside such a patient still is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from klip_med.calibration.centring import MIN_CENTRE_BLOCKS, centre_slice, slice_levels
from klip_med.calibration.fit import fit_null
from klip_med.calibration.null_model import NullModel
from klip_med.errors import KLIPMedError

GRID = (16, 16)


def _patients(rng, means, n_patients, per_patient, offset_sd=0.5, offset=0.0, windows=2):
    """Log-normal block densities of ``windows`` windows: per-position means + a patient level
    (``offset`` + N(0, offset_sd), the same in every window of the patient) + block noise (sd 0.5)."""
    densities, groups = [], []
    for p in range(n_patients):
        level = offset + rng.normal(0.0, offset_sd)
        for _ in range(per_patient):
            densities.append(np.exp(means + level + rng.normal(0.0, 0.5, (windows, *GRID))))
            groups.append(f"p{p}")
    return densities, groups


@pytest.fixture(scope="module")
def shifted_case():
    """20 calibration patients (3 slices each, patient levels N(0, 0.5)), and 100 fresh patients whose
    level is +1.5 log-nats above the calibration patients' mean (3 slices each)."""
    rng = np.random.default_rng(0)
    means = rng.normal(-3.0, 0.3, (2, *GRID))
    calib, groups = _patients(rng, means, 20, 3)
    fresh, _ = _patients(np.random.default_rng(1), means, 100, 3, offset=1.5)
    inside = [np.ones(GRID, bool)] * len(calib)
    fits = {c: fit_null(calib, [{}] * len(calib), inside, {}, "synthetic", "position", groups, centring=c)
            for c in ("none", "slice")}
    return fits, fresh


def _rates(null, fresh, alpha=0.01):
    inside = np.ones(GRID, bool)
    z = np.stack([null.z_scores(f, None, inside) for f in fresh])
    blocks = float((z >= null.z_threshold(alpha)).mean())
    slices = float(np.mean([(zk >= null.family_threshold(0.05, zk.size)).any() for zk in z]))
    return blocks, slices


def test_a_patient_above_the_calibration_patients_is_over_flagged_without_centring(shifted_case):
    fits, fresh = shifted_case
    blocks, slices = _rates(fits["none"], fresh)
    assert blocks > 0.05  # five times the nominal 1% and more
    assert slices > 0.5


def test_slice_centring_keeps_the_nominal_rates_on_a_shifted_patient(shifted_case):
    fits, fresh = shifted_case
    blocks, slices = _rates(fits["slice"], fresh)
    assert 0.005 <= blocks <= 0.015, blocks  # within [0.5x, 1.5x] of nominal 1%
    assert slices <= 0.075, slices  # family-wise 5%: at most 1.5x
    blocks5, _ = _rates(fits["slice"], fresh, 0.05)
    assert 0.025 <= blocks5 <= 0.075, blocks5


def test_a_lesion_in_a_shifted_patient_is_still_found_after_centring(shifted_case):
    fits, fresh = shifted_case
    null, inside = fits["slice"], np.ones(GRID, bool)
    found = 0
    for f in fresh[:60]:
        lesion = f.copy()
        lesion[:, 5:8, 5:8] *= np.exp(2.5)  # 9 blocks, +2.5 log-nats in every window
        z = null.z_scores(lesion, None, inside)
        hit = z >= null.family_threshold(0.05, z.size)
        found += bool(hit[5:8, 5:8].any())
        assert not hit.sum() > hit[5:8, 5:8].sum() + 2  # flags stay on the lesion
    assert found >= 55


def test_centring_removes_each_windows_in_body_median_and_leaves_small_slices_alone():
    z = np.zeros((2, 4, 4))
    z[0] += 3.0
    z[1, :2] = 1.0
    inside = np.zeros((4, 4), bool)
    inside[:, :3] = True  # 12 blocks
    np.testing.assert_allclose(slice_levels(z, inside), [3.0, np.median(z[1][inside])])
    np.testing.assert_allclose(centre_slice(z, inside)[0], 0.0)
    few = np.zeros((4, 4), bool)
    few.flat[: MIN_CENTRE_BLOCKS - 1] = True
    np.testing.assert_array_equal(slice_levels(z, few), [0.0, 0.0])
    with pytest.raises(KLIPMedError, match="inside"):
        slice_levels(z, np.ones((3, 3), bool))


def test_a_slice_centred_model_needs_the_in_body_blocks_and_keeps_its_centring_on_disk(shifted_case, tmp_path):
    fits, fresh = shifted_case
    null = fits["slice"]
    with pytest.raises(KLIPMedError, match="in-body blocks"):
        null.z_scores(fresh[0])
    back = NullModel.load(null.save(tmp_path / "m.json"))
    assert back.centring == "slice"
    inside = np.ones(GRID, bool)
    np.testing.assert_allclose(back.z_scores(fresh[0], None, inside), null.z_scores(fresh[0], None, inside))
    data = json.loads((tmp_path / "m.json").read_text())
    del data["centring"]  # a model written before centring existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert NullModel.load(tmp_path / "old.json").centring == "none"
    data["centring"] = "volume"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(KLIPMedError, match="centring"):
        NullModel.load(tmp_path / "bad.json")
    with pytest.raises(KLIPMedError, match="centring"):
        fit_null(fresh[:6], [{}] * 6, [inside] * 6, {}, "synthetic", "position", centring="patient")
