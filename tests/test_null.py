"""Null calibration of KLIP block maps: z-scores, p-values, thresholds, files, and fitting from runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from klip_med.calibration.conditions import null_conditions
from klip_med.calibration.covariates import block_covariates, block_intensity, block_texture
from klip_med.calibration.fit import fit_null
from klip_med.calibration.null_model import NullModel
from klip_med.calibration.scoring import apply_null
from klip_med.data.phantom import mr_phantom
from klip_med.errors import KLIPMedError
from klip_med.pipeline import KLIPSettings, parse_window
from klip_med.pipeline.calibrate import calibrate_images

GRID = (6, 6)


def _lognormal_images(n: int, rng: np.random.Generator, mu: np.ndarray, sigma: float = 0.5):
    """n images whose log block density is mu + sigma * N(0, 1), every block inside the body."""
    densities = [np.exp(mu + sigma * rng.standard_normal(mu.shape)) for _ in range(n)]
    covariates = [{"intensity": rng.uniform(-1, 1, mu.shape), "edge_distance": rng.uniform(0, 20, mu.shape)}
                  for _ in range(n)]
    insides = [np.ones(mu.shape, bool) for _ in range(n)]
    return densities, covariates, insides


def test_position_null_recovers_standard_scores_and_calibrated_p_values():
    rng = np.random.default_rng(0)
    mu = np.linspace(-8, -3, GRID[0] * GRID[1]).reshape(GRID)  # e.g. a radial bump from the operator
    null = fit_null(*_lognormal_images(400, rng, mu), {"block_size": 8}, "synthetic", conditioning="position")
    assert null.n_windows == 1 and null.mean.shape == (1, *GRID)
    assert np.allclose(null.mean[0], mu, atol=0.1) and np.allclose(null.std, 0.5, atol=0.06)
    # a block 4 standard deviations above its place's null is z ~ 4, whatever its place
    block = np.exp(mu)
    block[2, 3] = np.exp(mu[2, 3] + 4 * 0.5)
    z = null.z_scores(block)
    assert z[2, 3] == pytest.approx(4.0, abs=0.45) and np.abs(np.delete(z.ravel(), 2 * 6 + 3)).max() < 0.3
    assert null.scale == pytest.approx(1.0, abs=0.05)  # one window: the combined score is its z-score
    # p-values of fresh null images are calibrated: P(p <= a) ~ a
    fresh = _lognormal_images(200, np.random.default_rng(1), mu)[0]
    p = np.concatenate([null.p_values(null.z_scores(d)).ravel() for d in fresh])
    for a in (0.01, 0.05, 0.2):
        assert (p <= a).mean() == pytest.approx(a, abs=0.25 * a + 0.004)
    assert p.min() > 0 and p.max() <= 1
    # the threshold at a false-positive rate flags that fraction of fresh null blocks
    zt = null.z_threshold(0.05)
    flagged = np.mean([(null.z_scores(d) >= zt).mean() for d in fresh])
    assert flagged == pytest.approx(0.05, abs=0.015)


def test_binned_nulls_remove_their_covariate_and_none_keeps_the_ranking():
    rng = np.random.default_rng(2)
    covs = [{"intensity": rng.uniform(-1, 1, GRID), "edge_distance": rng.uniform(0, 30, GRID),
             "texture": rng.uniform(0, 0.5, GRID)} for _ in range(300)]
    for key, family in (("intensity", "intensity"), ("edge_distance", "edge"), ("texture", "texture")):
        densities = [np.exp(-6 + 2 * c[key] / np.abs(c[key]).max() + 0.3 * rng.standard_normal(GRID)) for c in covs]
        insides = [np.ones(GRID, bool)] * 300
        null = fit_null(densities, covs, insides, {}, "synthetic", conditioning=family, n_bins=10)
        z = np.concatenate([null.z_scores(d, c).ravel() for d, c in zip(densities, covs, strict=True)])
        x = np.concatenate([c[key].ravel() for c in covs])
        assert abs(np.corrcoef(z, x)[0, 1]) < 0.1, family  # raw log density vs covariate: correlation ~0.99
        with pytest.raises(KLIPMedError, match=key):
            null.z_scores(densities[0])
    pooled = fit_null(densities, covs, insides, {}, "synthetic", conditioning="none")
    d = densities[0]
    assert np.array_equal(np.argsort(pooled.z_scores(d).ravel()), np.argsort(d.ravel()))


def test_auto_picks_the_family_that_predicts_held_out_id_images():
    """KL that depends on the place -> position; on the distance to the edge with shifting anatomy
    -> edge; on nothing -> none (the simplest family wins a tie through its smaller variance)."""
    rng = np.random.default_rng(11)
    place = np.linspace(-8, -3, GRID[0] * GRID[1]).reshape(GRID)
    by_place = [np.exp(place + 0.3 * rng.standard_normal(GRID)) for _ in range(40)]
    covs = [{"intensity": np.zeros(GRID), "edge_distance": rng.permutation(np.arange(36.0)).reshape(GRID)}
            for _ in range(40)]
    insides = [np.ones(GRID, bool)] * 40
    groups = [f"P{k // 4}" for k in range(40)]
    null = fit_null(by_place, covs, insides, {}, "s", groups=groups)
    assert null.conditioning == "position" and null.extra["selection"]["chosen"] == "position"
    assert set(null.extra["selection"]["heldout_loglik_nats_per_block_window"]) == {"none", "position", "edge"}
    by_edge = [np.exp(-8 + c["edge_distance"] / 7 + 0.3 * rng.standard_normal(GRID)) for c in covs]
    assert fit_null(by_edge, covs, insides, {}, "s", groups=groups).conditioning == "edge"
    assert fit_null(by_edge, covs, insides, {}, "s", groups=["one"] * 40).extra["selection"]["groups"] == 40
    with pytest.raises(KLIPMedError, match="groups"):
        fit_null(by_edge, covs, insides, {}, "s", groups=["one"] * 39)


def test_windows_combine_into_one_standard_score():
    """Two windows: independent ones add up to a sqrt(2)-wide sum, rescaled to unit spread; a block
    shifted in one window only gets half the evidence of one shifted in both."""
    rng = np.random.default_rng(7)
    mu = np.stack([np.full(GRID, -3.0), np.full(GRID, -7.0)])  # the early window carries more KL
    densities = [np.exp(mu + 0.5 * rng.standard_normal(mu.shape)) for _ in range(300)]
    covariates = [{"intensity": np.zeros(GRID), "edge_distance": np.zeros(GRID)}] * 300
    insides = [np.ones(GRID, bool)] * 300
    null = fit_null(densities, covariates, insides, {}, "synthetic", conditioning="position")
    assert null.n_windows == 2 and null.scale == pytest.approx(np.sqrt(2), rel=0.06)
    assert np.std(null.reference_z) == pytest.approx(1.0, abs=0.02)
    one, both = np.exp(mu.copy()), np.exp(mu.copy())
    one[1, 0, 0] *= np.exp(1.5)  # 3 sd in the late window only
    both[:, 0, 0] *= np.exp(1.5)
    assert null.z_scores(both)[0, 0] == pytest.approx(2 * null.z_scores(one)[0, 0], rel=0.1)
    assert null.window_z_scores(one).shape == (2, *GRID)
    with pytest.raises(KLIPMedError, match="windows=2"):
        null.z_scores(np.exp(mu[0]))


def test_blocks_outside_the_body_borrow_global_statistics():
    rng = np.random.default_rng(3)
    densities, covariates, insides = _lognormal_images(50, rng, np.full(GRID, -5.0))
    for m in insides:
        m[0, 0] = False  # never inside the body
    densities[0][0, 0] = 1e6  # must not leak into the statistics
    null = fit_null(densities, covariates, insides, {}, "synthetic", conditioning="position", shrinkage=5.0)
    assert null.mean[0, 0, 0] == pytest.approx(null.extra["log_density_mean"][0])
    assert null.reference_z.size == 50 * 35  # only in-body blocks, each scored with its image left out


def test_save_load_roundtrip_and_refusals(tmp_path):
    rng = np.random.default_rng(4)
    conditions = {"physics": "mri:accel=4", "block_size": 8, "window": {"name": "t:0.6,1"}}
    null = fit_null(*_lognormal_images(20, rng, np.full(GRID, -5.0)), conditions, "synthetic",
                         conditioning="position")
    path = null.save(tmp_path / "null.json")
    back = NullModel.load(path)
    assert back.conditioning == "position" and np.allclose(back.mean, null.mean) and back.scale == null.scale
    assert np.array_equal(back.reference_z, null.reference_z) and back.conditions == conditions
    assert not list(tmp_path.glob("*.tmp*"))
    back.check_conditions(dict(conditions))
    with pytest.raises(KLIPMedError, match=r"physics: fitted 'mri:accel=4', now 'mri:accel=8'"):
        back.check_conditions({**conditions, "physics": "mri:accel=8"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KLIPMedError, match="bad.json: expected a klip-med null model"):
        NullModel.load(bad)
    data = json.loads(path.read_text())
    bad.write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(KLIPMedError, match="bad.json: expected a JSON object with format"):
        NullModel.load(bad)
    bad.write_text(json.dumps({**data, "std": [[0.0] * 6] * 6}))
    with pytest.raises(KLIPMedError, match="bad.json: arrays"):
        NullModel.load(bad)
    bad.write_text(json.dumps({**data, "colour": 1}))
    with pytest.raises(KLIPMedError, match="unknown"):
        NullModel.load(bad)


def test_fit_refuses_bad_input():
    rng = np.random.default_rng(5)
    d, i, m = _lognormal_images(5, rng, np.full(GRID, -5.0))
    with pytest.raises(KLIPMedError, match="conditioning"):
        fit_null(d, i, m, {}, "x", conditioning="texture")
    with pytest.raises(KLIPMedError, match=r"block grid\) shape shared"):
        fit_null(d[:4] + [np.ones((3, 3))], i, m, {}, "x")
    with pytest.raises(KLIPMedError, match="densities"):
        fit_null([-x for x in d], i, m, {}, "x")
    with pytest.raises(KLIPMedError, match=">= 2"):
        fit_null(d[:1], i[:1], m[:1], {}, "x")
    null = fit_null(d, i, m, {}, "x", conditioning="position")
    with pytest.raises(KLIPMedError, match="fpr"):
        null.z_threshold(0.0)
    with pytest.raises(KLIPMedError, match="block grid"):
        null.z_scores(np.ones((4, 4)))


def test_block_intensity_handles_partial_edge_blocks():
    image = np.arange(25, dtype=float).reshape(5, 5)
    b = block_intensity(image, 2)
    assert b.shape == (3, 3)
    assert b[0, 0] == pytest.approx(np.mean([0, 1, 5, 6])) and b[2, 2] == pytest.approx(24.0)


def test_block_texture_is_the_block_std_and_a_covariate():
    image = np.arange(25, dtype=float).reshape(5, 5)
    t = block_texture(image, 2)
    assert t.shape == (3, 3)
    assert t[0, 0] == pytest.approx(np.std([0, 1, 5, 6])) and t[2, 2] == pytest.approx(0.0)
    assert t[0, 2] == pytest.approx(np.std([4, 9]))  # partial edge block: its own pixels only
    flat = block_covariates(np.full((8, 8), 0.3), np.ones((8, 8), bool), 4)
    assert set(flat) == {"intensity", "texture", "edge_distance"} and np.allclose(flat["texture"], 0.0, atol=1e-6)


def test_texture_null_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(6)
    covs = [{"texture": rng.uniform(0, 0.5, GRID)} for _ in range(40)]
    densities = [np.exp(-6 + 4 * c["texture"] + 0.2 * rng.standard_normal(GRID)) for c in covs]
    null = fit_null(densities, covs, [np.ones(GRID, bool)] * 40, {}, "synthetic", conditioning="texture")
    back = NullModel.load(null.save(tmp_path / "texture.json"))
    assert back.conditioning == "texture" and back.mean.shape == (1, back.edges.size + 1)
    np.testing.assert_allclose(back.z_scores(densities[0], covs[0]), null.z_scores(densities[0], covs[0]))


def test_calibrate_images_fits_on_reconstructions_and_applies_to_a_result():
    from test_eval import tiny_prior

    torch.set_num_threads(1)
    prior = tiny_prior(16)
    settings = KLIPSettings(samples=2, steps=3, block_size=4,
                            windows=(parse_window("t:0.3,1", prior.alphas_cumprod),))
    rng = np.random.default_rng(0)
    images = [2 * mr_phantom(16, rng).image - 1 for _ in range(6)]
    spec = "mri:accel=2,center=0.25,noise=0.01"
    null = calibrate_images(prior, spec, settings, images, "phantoms", log=None)
    assert null.n_images == 6 and null.source == "phantoms" and null.conditioning in ("none", "position", "edge")
    assert null.extra["selection"]["groups"] == 6
    assert null.conditions == null_conditions(prior, spec, settings)
    assert null.conditions["windows"][0]["name"] == "t:0.3,1" and null.conditions["block_size"] == 4
    from klip_med.pipeline import reconstruct_image

    result, _ = reconstruct_image(prior, torch.from_numpy(images[0].astype(np.float32)), spec, settings)
    z, p = apply_null(null, result)
    assert z.shape == p.shape == (4, 4) and np.isfinite(z).all() and ((p > 0) & (p <= 1)).all()


def test_default_windows_keep_the_ones_holding_steps():
    from test_eval import tiny_prior

    from klip_med.pipeline import CALIBRATED_WINDOWS, RUN_WINDOWS, default_windows

    prior = tiny_prior(16)  # 100-step schedule
    many = default_windows(prior, KLIPSettings(steps=50))
    assert [w.label for w in many] == list(RUN_WINDOWS) and len(CALIBRATED_WINDOWS) == 9
    few = default_windows(prior, KLIPSettings(steps=3))
    assert 1 <= len(few) < len(RUN_WINDOWS) and few[0].label == "t:0.1,1"
    dps = default_windows(prior, KLIPSettings(steps=50, sampler="dps"))  # DPS: its signal is in the last 10%
    assert [w.label for w in dps] == ["full", *CALIBRATED_WINDOWS]


@pytest.mark.parametrize("prior_name", ["mri-brain-flair-128", "ct-abdomen-128"])
def test_every_shipped_null_model_is_readable_and_belongs_to_its_prior(prior_name):
    """A shipped model the current code cannot read would make ``--null auto`` silently find nothing."""
    from klip_med import priors
    from klip_med.priors.identity import prior_identity
    from klip_med.priors.registry import SHIPPED_DIR

    files = sorted((SHIPPED_DIR / prior_name / "nulls").glob("*.json"))
    assert files, f"{prior_name}: no shipped null model"
    digest = prior_identity(priors.load(prior_name))["weights_sha256"]
    for path in files:
        model = NullModel.load(path)
        assert model.conditions["prior_weights_sha256"] == digest, path.name
        assert model.spread == "predictive" and 0.0 < model.effective_fraction <= 1.0
        assert len(model.fingerprints) == model.n_images  # the overlap guard has something to check
        assert model.z_threshold(0.01) > model.z_threshold(0.05) > 0
