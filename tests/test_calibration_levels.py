"""Calibration a reviewer can trust: honest spread where data are thin, block / slice / volume levels,
Benjamini-Hochberg, the fitted tail, and the guard against scoring calibration images."""

from __future__ import annotations


import numpy as np
import pytest
from scipy import stats

from klip_med.calibration.fit import fit_null
from klip_med.calibration.levels import benjamini_hochberg, family_p, family_threshold, fit_effective_fraction
from klip_med.calibration.null_model import NullModel
from klip_med.calibration.tails import Tail
from klip_med.errors import KLIPMedError


def _images(n: int, rng, position_mean: np.ndarray, sparse_row: int | None = None, seen: int = 2, sd: float = 0.5):
    """Log-normal block densities around per-position means; with ``sparse_row`` that row is inside the
    body in the first ``seen`` images only (a body edge that only larger patients reach)."""
    densities, insides = [], []
    for k in range(n):
        densities.append(np.exp(position_mean + rng.normal(0.0, sd, position_mean.shape)))
        inside = np.ones(position_mean.shape, bool)
        if sparse_row is not None and k >= seen:
            inside[sparse_row] = False
        insides.append(inside)
    return densities, insides


@pytest.fixture(scope="module")
def sparse_case():
    """The issue's synthetic case: 60 calibration images, one block row 2 log-nats above the rest and
    inside the body in only 2 of them; 300 fresh healthy images with that row inside."""
    rng = np.random.default_rng(0)
    means = rng.normal(-3.0, 0.3, (16, 16))
    means[3] += 2.0
    calib = _images(60, rng, means, sparse_row=3)
    fresh, _ = _images(300, np.random.default_rng(100), means)
    return calib, fresh


@pytest.mark.parametrize(("spread", "row_band", "others_band"), [
    ("predictive", (0.005, 0.015), (0.005, 0.015)),  # within [0.5x, 1.5x] of the nominal 1%
    ("legacy", (0.3, 1.0), (0.005, 0.015)),  # the first round's estimator: the sparse row over-flagged
])
def test_a_row_seldom_inside_the_body_is_flagged_at_the_nominal_rate(sparse_case, spread, row_band, others_band):
    (densities, insides), fresh = sparse_case
    null = fit_null(densities, [{}] * len(densities), insides, {}, "synthetic", conditioning="position", spread=spread)
    z = np.stack([null.z_scores(f) for f in fresh])
    flagged = z >= null.z_threshold(0.01)
    row, others = flagged[:, 3].mean(), np.delete(flagged, 3, axis=1).mean()
    assert row_band[0] <= row <= row_band[1], row
    assert others_band[0] <= others <= others_band[1], others


def test_slice_level_p_values_and_family_threshold_hold_their_rate_on_fresh_slices(sparse_case):
    (densities, insides), fresh = sparse_case
    null = fit_null(densities, [{}] * len(densities), insides, {}, "synthetic", conditioning="position")
    assert 0.6 <= null.effective_fraction <= 1.0  # independent blocks: about one test per block
    z_max = np.array([null.z_scores(f).max() for f in fresh])
    slice_p = null.family_p(z_max, 256)
    assert 0.02 <= np.mean(slice_p <= 0.05) <= 0.09  # nominal 5%, 300 slices
    threshold = null.family_threshold(0.05, 256)
    assert np.mean(z_max >= threshold) == pytest.approx(np.mean(slice_p <= 0.05), abs=0.01)
    assert threshold > null.z_threshold(0.05)  # a slice's maximum needs more than one block's 5%


def test_family_threshold_matches_the_hand_computed_gaussian_case():
    """Reference = a million standard normal draws, c = 1: the z that the max of n independent
    blocks reaches with probability alpha is Phi^-1((1 - alpha)^(1/n))."""
    tail = Tail.fit(np.random.default_rng(0).standard_normal(1_000_000))
    for n, alpha in ((1, 0.05), (100, 0.05), (2000, 0.05)):
        expected = stats.norm.ppf((1 - alpha) ** (1 / n))
        assert family_threshold(tail, alpha, n, 1.0) == pytest.approx(expected, abs=0.06), n
    # and family_p inverts it: the max at that threshold has family p-value alpha
    z = family_threshold(tail, 0.05, 500, 0.7)
    assert family_p(tail.p_values(z), 500, 0.7) == pytest.approx(0.05, rel=0.05)


def test_tail_is_empirical_inside_the_data_and_smooth_beyond():
    ref = np.random.default_rng(1).standard_normal(5000)
    tail = Tail.fit(ref)
    assert tail.p_values(0.0) == pytest.approx((1 + (ref >= 0).sum()) / 5001)
    beyond = tail.p_values(np.array([4.0, 4.5, 5.0]))
    assert (np.diff(beyond) < 0).all() and beyond[0] < 10 / 5001  # keeps falling past the largest draw
    assert stats.norm.sf(4.0) / 5 <= beyond[0] <= 5 * stats.norm.sf(4.0)  # 3.2e-5 within a factor of 5
    assert tail.z_at(0.01) == pytest.approx(np.quantile(ref, 0.99), abs=0.05)
    assert tail.p_values(tail.z_at(1e-5)) == pytest.approx(1e-5, rel=1e-6)  # z_at inverts p_values
    heavy = Tail.fit(stats.t(3).rvs(size=5000, random_state=3))
    assert heavy.df <= 6 and tail.df >= 20  # the heavier tail is recognised, the Gaussian one too
    assert tail.p_values(5.0, safe=True) >= tail.p_values(5.0)  # the safe fit never has the lighter tail
    assert heavy.p_values(stats.t(3).isf(1e-5)) == pytest.approx(1e-5, rel=4.0)
    assert heavy.p_values(8.0) > tail.p_values(8.0)


def test_effective_fraction_recovers_independent_and_correlated_blocks():
    rng = np.random.default_rng(2)
    n = np.full(400, 50)
    independent = 1 - (1 - rng.random(400)) ** (1 / 50)  # the min of 50 uniform p-values
    assert fit_effective_fraction(independent, n) == pytest.approx(1.0, abs=0.1)
    ten = 1 - (1 - rng.random(400)) ** (1 / 10)  # blocks that move in groups of five: 10 tests
    assert fit_effective_fraction(ten, n) == pytest.approx(0.2, rel=0.15)
    with pytest.raises(KLIPMedError, match="slice maxima"):
        fit_effective_fraction(np.array([0.1]), np.array([5]))


def test_benjamini_hochberg_against_a_hand_computed_case():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # q = 0.05, m = 10: thresholds 0.005, 0.01, 0.015, 0.02, 0.025, ...: the largest k with p_(k) <= kq/m is 2
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True] + [False] * 8
    # q = 0.2: p_(7) = 0.074 <= 0.14, p_(8..10) = 0.205, 0.212, 0.216 > 0.16, 0.18, 0.2: the first 7
    assert benjamini_hochberg(p[::-1], 0.2)[::-1].tolist() == [True] * 7 + [False] * 3
    assert benjamini_hochberg(np.array([[0.5, 0.001], [0.2, 0.9]]), 0.05).tolist() == [[False, True], [False, False]]
    with pytest.raises(KLIPMedError, match="q: expected a false-discovery rate"):
        benjamini_hochberg(p, 1.5)


def test_fingerprints_find_calibration_images_by_key_or_by_pixels(tmp_path, sparse_case):
    (densities, insides), _ = sparse_case
    prints = [{"key": f"lgg:file{k}.npz[3]", "sha256": f"{k:064x}"} for k in range(len(densities))]
    null = fit_null(densities, [{}] * len(densities), insides, {}, "synthetic", conditioning="none",
                    fingerprints=prints)
    again = NullModel.load(null.save(tmp_path / "null.json"))
    assert again.fingerprints == null.fingerprints and again.effective_fraction == null.effective_fraction
    probe = [{"key": "lgg:file3.npz[3]", "sha256": None}, {"key": None, "sha256": f"{7:064x}"},
             {"key": "lgg:other.npz[1]", "sha256": "f" * 64}]
    assert again.overlap(probe) == ["lgg:file3.npz[3]", f"{7:064x}"]
    with pytest.raises(KLIPMedError, match="fingerprints: expected one per image"):
        fit_null(densities, [{}] * len(densities), insides, {}, "s", conditioning="none", fingerprints=prints[:3])


def test_observed_rates_give_an_interval_only_with_enough_patients():
    from klip_med.eval.null_rates import observed_rate

    flags = np.array([1, 0, 0, 0, 1, 0, 0, 0], dtype=float)
    two = observed_rate(flags, ["a"] * 4 + ["b"] * 4, 200, 0)
    assert two["observed"] == 0.25 and two["ci"] == [None, None] and "2 patients" in two["interval"]
    assert two["per_patient"] == {"a": 0.25, "b": 0.25}
    patients = [f"p{k}" for k in range(8)]
    eight = observed_rate(flags, patients, 200, 0)
    assert eight["interval"] is None and 0.0 <= eight["ci"][0] <= 0.25 <= eight["ci"][1] <= 1.0


def test_the_tail_fit_of_c_puts_the_healthy_slices_at_the_level_by_hand():
    from klip_med.calibration.levels import tail_effective_fraction

    rng = np.random.default_rng(3)
    q = 10.0 ** rng.uniform(-3, -2, 39)  # 39 healthy slices: k = floor(0.05 * 40) = 2; c_s in (0.03, 0.7)
    n = rng.integers(80, 160, 39).astype(float)
    c_s = np.log(0.95) / (n * np.log1p(-q))  # the c at which each slice reaches p_family = 0.05
    c = tail_effective_fraction(q, n)
    assert c == pytest.approx(np.sort(c_s)[::-1][1]) and c_s.max() < 1.0
    flagged = family_p(q, n, c) <= 0.05 + 1e-12
    assert flagged.sum() == 2 and set(np.flatnonzero(flagged)) == set(np.argsort(c_s)[-2:])
    assert tail_effective_fraction(q[:18], n[:18]) is None  # 18 slices: k = 0, too few for 5%
    with pytest.raises(KLIPMedError):
        tail_effective_fraction(q[:1], n[:1])


def test_the_slice_level_fit_records_both_fits_and_holds_the_rate_that_the_ml_fit_misses():
    """Slices whose maxima are heavier-tailed than the one-parameter form (a patient level shared by
    the blocks of a slice): the maximum-likelihood c over-flags held-out healthy slices at 5%, the tail
    fit does not."""
    rng = np.random.default_rng(5)
    means = rng.normal(-3.0, 0.3, (16, 16))
    densities, groups = [], []
    for p in range(30):
        level = rng.normal(0.0, 0.6)
        for _ in range(2):
            densities.append(np.exp(means + level + rng.normal(0.0, 0.5, means.shape)))
            groups.append(f"p{p}")
    inside = [np.ones(means.shape, bool)] * len(densities)
    null = fit_null(densities, [{}] * len(densities), inside, {}, "synthetic", "position", groups)
    level = null.extra["slice_level"]
    assert level["fit"].startswith("tail") and level["effective_fraction"] == null.effective_fraction
    assert level["heldout_slice_rate_at_0.05"] <= 0.05 < level["heldout_slice_rate_at_0.05_ml"]
