"""klip_med.eval: metrics against hand-computed cases, baselines on toy cases with known answers,
the slice selection rule, and the benchmark runner end to end (tiny prior, resume, determinism)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from klip_med.cli.eval import add_parser as add_eval_parser
from klip_med.data.lesions import insert_flair_lesion, soft_tissue_mask_ct
from klip_med.data.manifest import file_sha256, read_manifest
from klip_med.data.phantom import ct_phantom, mr_phantom
from klip_med.data.selection import select_slices, slice_seed
from klip_med.errors import KLIPMedError
from klip_med.eval import baselines as bl
from klip_med.eval import metrics as mt
from klip_med.eval.cache import read_slice, slice_path
from klip_med.eval.features import fit_feature_density
from klip_med.eval.runner import run_benchmark
from klip_med.physics import parse_physics
from klip_med.pipeline import KLIPSettings, reconstruct_measurement
from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
from klip_med.priors.diffusion import DiffusionPrior
from klip_med.priors.gaussian import GaussianPrior
from klip_med.priors.intensity import IntensityRule
from klip_med.sampling.schedule import linear_beta_alphas_cumprod


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run ~40x slower with 2 threads on a loaded shared CPU (spin-waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- metrics


def test_auroc_perfect_inverted_and_hand_computed():
    labels = [0, 0, 1, 1]
    assert mt.auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert mt.auprc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert mt.auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert mt.auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    # 3 of the 4 (positive, negative) pairs are ordered correctly -> 0.75; AP = (1 + 2/3) / 2
    assert mt.auroc([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx(0.75)
    assert mt.auprc([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx((1 + 2 / 3) / 2)


def test_auroc_equals_mann_whitney_on_random_scores():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # with ties
    labels = rng.integers(0, 2, size=60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    assert mt.auroc(scores, labels) == pytest.approx(wins / (pos.size * neg.size))
    random_like = [mt.auroc(rng.normal(size=400), rng.integers(0, 2, size=400)) for _ in range(5)]
    assert abs(np.mean(random_like) - 0.5) < 0.05


def test_fast_bootstrap_metrics_agree_with_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(2)
    for n in (5, 40, 300):
        scores = np.round(rng.normal(size=n), 1)  # many ties
        labels = rng.integers(0, 2, size=n)
        labels[:2] = [0, 1]
        assert mt.fast_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert mt.fast_average_precision(scores, labels) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12)
    assert math.isnan(mt.fast_auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_metrics_refuse_one_class_and_bad_input():
    with pytest.raises(KLIPMedError, match="both classes"):
        mt.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(KLIPMedError, match="as many scores as labels"):
        mt.auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(KLIPMedError, match="finite"):
        mt.auroc([0.1, math.nan], [0, 1])
    assert mt.dataset_level([0.1, 0.2], [0, 0], ["a", "b"])["auroc"] is None


def test_bootstrap_interval_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    patients = np.repeat([f"p{i}" for i in range(8)], 6)
    labels = np.tile([0, 1, 0, 1, 0, 1], 8)
    scores = labels * 0.8 + rng.normal(size=labels.size)
    first = mt.dataset_level(scores, labels, patients, n_boot=300, seed=7)
    again = mt.dataset_level(scores, labels, patients, n_boot=300, seed=7)
    other = mt.dataset_level(scores, labels, patients, n_boot=300, seed=8)
    lo, hi = first["auroc_ci"]
    assert lo <= first["auroc"] <= hi and 0 < lo < hi < 1
    assert first == again and first["auroc_ci"] != other["auroc_ci"]
    assert first["n_patients"] == 8 and first["n_ood"] == 24 and first["bootstrap_valid"] == 300
    # a single patient: every resample is the same set, the interval collapses onto the estimate
    one = mt.patient_bootstrap(lambda i: float(scores[i].mean()), ["p"] * labels.size, n_boot=20, seed=0)
    assert one.low == pytest.approx(scores.mean()) and one.high == pytest.approx(scores.mean())


def test_lesion_blocks_handle_partial_edge_blocks():
    mask = np.zeros((10, 10), dtype=bool)
    mask[9, 9] = True
    mask[0, 4] = True
    blocks = mt.lesion_blocks(mask, 4)
    assert blocks.shape == (3, 3)
    assert blocks[2, 2] and blocks[0, 1] and blocks.sum() == 2


def test_localisation_is_one_when_the_lesion_block_is_highest():
    size, b = 32, 8
    lesion = np.zeros((size, size), dtype=bool)
    lesion[18:22, 9:14] = True  # blocks (2, 1)
    score_map = np.random.default_rng(0).uniform(0, 0.5, size=(4, 4))
    score_map[2, 1] = 1.0
    inside = np.ones((4, 4), dtype=bool)
    labels = mt.lesion_blocks(lesion, b)
    loc = mt.localisation(score_map, labels, inside)
    assert loc.auroc == 1.0 and loc.auprc == 1.0 and loc.n_lesion_blocks == 1 and loc.n_blocks == 16
    assert mt.localisation(-score_map, labels, inside).auroc == 0.0
    # blocks outside the body do not count: the highest outside block cannot hurt
    score_map[0, 0] = 5.0
    inside[0, 0] = False
    assert mt.localisation(score_map, labels, inside).auroc == 1.0
    # a lesion over every inside block has no AUROC: skipped and counted
    undefined = mt.localisation(score_map, np.ones((4, 4), dtype=bool), inside)
    assert undefined.auroc is None
    summary = mt.localisation_level([loc, undefined], ["a", "b"], n_boot=50)
    assert summary["auroc"] == 1.0 and summary["n_images"] == 1 and summary["n_skipped"] == 1


def test_paired_difference_of_identical_methods_is_zero():
    a = [0.9, 0.7, None, 0.8, 0.6, 0.5, 0.4]  # six patients with a value: enough for an interval
    out = mt.paired_difference(a, a, [f"p{k}" for k in range(7)], n_boot=50)
    assert out == {"mean": 0.0, "ci": [0.0, 0.0], "n": 6, "interval": None}


# ---------------------------------------------------------------- baselines


def test_centrality_peaks_at_the_centre_and_is_symmetric():
    c = bl.centrality_blocks((40, 40), 8)
    assert c.shape == (5, 5)
    assert np.unravel_index(np.argmax(c), c.shape) == (2, 2) and c[2, 2] == 0.0
    assert np.allclose(c, c.T) and np.allclose(c, c[::-1, ::-1])
    # partial edge block: 20 pixels with blocks of 8 -> centres 3.5, 11.5, 17.5 vs image centre 9.5
    assert np.allclose(bl.centrality_blocks((20, 20), 8)[0], -np.hypot(np.array([3.5, 11.5, 17.5]) - 9.5, 6.0))


def test_residual_map_is_the_image_error_for_full_sampling():
    physics = parse_physics("mri:accel=1,center=0,noise=0", 16, generator=torch.Generator().manual_seed(0))
    truth = torch.zeros(1, 1, 16, 16)
    truth[0, 0, 4:8, 4:8] = 0.5
    y = physics.A(truth)
    assert torch.allclose(bl.residual_map(physics, truth[0, 0], y), torch.zeros(16, 16), atol=1e-6)
    wrong = truth.clone()
    wrong[0, 0, 10, 12] += 0.3
    assert torch.allclose(bl.residual_map(physics, wrong[0, 0], y), (wrong - truth).abs()[0, 0], atol=1e-6)


def test_brightness_deviation_is_distance_from_the_body_median():
    image = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 3.0, 4.0]])
    body = image > 0
    dev = bl.brightness_deviation_map(image, body)
    assert torch.allclose(dev, (image - 2.0).abs())  # torch median of [1, 2, 3, 4] is the lower one: 2


def _gaussian_prior(var: np.ndarray, mean: float = 0.0) -> GaussianPrior:
    n = var.size
    return GaussianPrior(torch.full((n,), mean), torch.diag(torch.as_tensor(var.reshape(-1))),
                         (1, *var.shape), linear_beta_alphas_cumprod(1000))


def test_eigenscore_finds_the_known_leading_posterior_eigenpair():
    """Gaussian prior, diagonal covariance with one high-variance pixel: the exact posterior
    covariance of x0 given u = x0 + sigma z is diag(v sigma^2 / (v + sigma^2)), so the top
    eigenvalue over sigma^2 is 4 / (4 + sigma^2) at that pixel."""
    var = np.full((4, 4), 0.01)
    var[1, 2] = 4.0
    prior = _gaussian_prior(var)
    levels = (0.1, 0.3)
    m, score, nfe, info = bl.eigenscore(prior, torch.zeros(4, 4), torch.Generator().manual_seed(0), levels,
                                        rank=2, iterations=3)
    assert m.shape == (4, 4) and nfe == len(levels) * (1 + 3 * 2)
    assert np.unravel_index(int(torch.argmax(m)), (4, 4)) == (1, 2)
    expected = [4.0 / (4.0 + lvl["sigma"] ** 2) for lvl in info["levels"]]
    assert score == pytest.approx(np.mean(expected), rel=1e-3)
    for lvl in info["levels"]:
        s2 = lvl["sigma"] ** 2
        assert lvl["eigenvalues_over_sigma2"][1] == pytest.approx(0.01 / (0.01 + s2), rel=1e-2, abs=1e-4)


def test_anoddpm_error_is_largest_where_the_image_leaves_the_prior():
    prior = _gaussian_prior(np.full((16, 16), 0.01))
    x = torch.zeros(16, 16)
    x[8:12, 4:8] = 1.0  # a bright square a N(0, 0.01) prior cannot explain
    gen = torch.Generator().manual_seed(0)
    m, nfe, ts = bl.anoddpm_map(prior, x, gen, t_frac=0.5, steps=3)
    assert m.shape == (16, 16) and nfe == 3 and ts[0] == round(0.5 * 999) and ts[-1] == 0
    blocks = m.reshape(4, 4, 4, 4).mean(dim=(1, 3))
    assert np.unravel_index(int(torch.argmax(blocks)), (4, 4)) == (2, 1)
    again, _, _ = bl.anoddpm_map(prior, x, torch.Generator().manual_seed(0), t_frac=0.5, steps=3)
    assert torch.equal(m, again)
    assert bl.anoddpm_map(prior, x, gen, t_frac=0.5, steps=1)[1] == 1


def test_cfs_density_scores_training_like_features_low_and_new_features_high():
    """Fitted on healthy phantoms, the feature density gives a slice like them a lower mean
    Mahalanobis distance than the same slice with a large bright lesion, and most of its
    excess lies on the lesion."""
    prior = tiny_prior(32)
    rng = np.random.default_rng(0)
    train = torch.from_numpy(np.stack([2 * mr_phantom(32, rng).image - 1 for _ in range(12)]))[:, None]
    density = fit_feature_density(prior, train, torch.Generator().manual_seed(0))
    assert density.mean.numel() == 48 and density.n_slices == 12
    ph = mr_phantom(32, rng)
    ins = insert_flair_lesion(ph.image, ph.pixel_spacing_mm, rng, diameter_mm=60.0, contrast=0.5,
                              placement_mask=ph.masks["brain"])
    healthy = density.score_map(prior, torch.from_numpy(2 * ph.image - 1), torch.Generator().manual_seed(1))
    lesioned = density.score_map(prior, torch.from_numpy(2 * ins.image - 1), torch.Generator().manual_seed(1))
    assert healthy.shape == (32, 32) and float(lesioned.mean()) > float(healthy.mean())
    excess = (lesioned - healthy).numpy()
    assert excess[ins.mask].mean() > excess[~ins.mask].mean()


def tiny_prior(size: int = 16) -> DiffusionPrior:
    config = PriorConfig(
        name="tiny", modality="MR", image_size=size, architecture=default_architecture((16, 16, 16, 16)),
        schedule=default_schedule(100), intensity=IntensityRule("mr-percentile", percentile=99.0, reference=0.8),
        weights_dtype="float32",
    )
    torch.manual_seed(0)  # test-only: the network's random initialisation
    return DiffusionPrior(config).eval().requires_grad_(False)


def untrained_companions(prior, levels: int = 3):
    """A DLSR model and a level classifier of the right shapes for ``prior`` (random weights: for
    the mechanics, not the numbers)."""
    from klip_med.eval.companions import init_parameters
    from klip_med.eval.diffguard import LevelClassifier
    from klip_med.eval.dlsr import DLSR, FeatureDenoiser, layer_channels

    channels = layer_channels(prior)
    net = init_parameters(FeatureDenoiser(sum(channels), 16, 1), torch.Generator().manual_seed(0)).eval()
    dlsr = DLSR(net, torch.zeros(sum(channels)), torch.ones(sum(channels)), channels)
    classifier = init_parameters(LevelClassifier(levels, (8, 8, 8, 8), prior.alphas_cumprod.numel()),
                                 torch.Generator().manual_seed(1)).eval()
    return dlsr, classifier


def test_compute_baselines_shapes_and_identities():
    prior = tiny_prior(16)
    image = torch.from_numpy(2 * mr_phantom(16).image - 1)
    physics = parse_physics("mri:accel=2,center=0.25,noise=0.01", 16, generator=torch.Generator().manual_seed(0))
    y = physics(image.reshape(1, 1, 16, 16))
    result = reconstruct_measurement(prior, physics, y, KLIPSettings(samples=2, steps=3, block_size=4))
    settings = bl.BaselineSettings(anoddpm_steps=2, eigen_levels=(0.3,), eigen_rank=2, eigen_iterations=2,
                                   diffguard_steps=2, monai_timesteps=3)
    with pytest.raises(KLIPMedError, match="feature_density"):
        bl.compute_baselines(prior, physics, y, result, torch.Generator().manual_seed(1), settings)
    train = torch.from_numpy(np.stack([2 * mr_phantom(16, np.random.default_rng(k)).image - 1 for k in range(4)]))
    density = fit_feature_density(prior, train[:, None], torch.Generator().manual_seed(0))
    with pytest.raises(KLIPMedError, match="dlsr: expected a trained DLSR model"):
        bl.compute_baselines(prior, physics, y, result, torch.Generator().manual_seed(1), settings, density)
    dlsr, classifier = untrained_companions(prior)
    maps = bl.compute_baselines(prior, physics, y, result, torch.Generator().manual_seed(1), settings, density,
                                dlsr=dlsr, diffguard=classifier)
    assert list(maps) == list(bl.BASELINES)
    assert maps["monai_likelihood"].nfe == 3 and maps["dlsr"].nfe == 1 and maps["diffguard"].nfe == 2
    assert maps["diffguard"].native_score is not None and maps["diffguard"].native_score >= 0
    # a post-hoc baseline does not depend on which others are computed, and reads the float16 posterior mean
    alone = bl.post_hoc_baselines(prior, bl.as_cached(result.recon_mean), torch.Generator().manual_seed(1), settings,
                                  ["anoddpm"])
    assert np.array_equal(alone["anoddpm"].pixel_map, maps["anoddpm"].pixel_map)
    for name, m in maps.items():
        if name == "centrality":
            assert m.pixel_map is None
            continue
        assert m.pixel_map.shape == (16, 16) and np.isfinite(m.pixel_map).all(), name
    assert np.array_equal(maps["brightness"].pixel_map, result.baseline.numpy())
    assert np.array_equal(maps["posterior_std"].pixel_map, result.recon_std.numpy())
    assert maps["anoddpm"].nfe == 2 and maps["eigenscore"].nfe == 1 + 2 * 2
    assert maps["eigenscore"].native_score is not None and maps["cfs"].nfe == 1
    assert all(maps[n].nfe == 0 for n in ("posterior_std", "residual", "brightness", "brightness_dev"))
    skipped = bl.compute_baselines(prior, physics, y, result, torch.Generator().manual_seed(1),
                                   bl.BaselineSettings(skip=bl.POST_HOC))
    assert not set(skipped) & set(bl.POST_HOC)
    with pytest.raises(KLIPMedError, match="skip: expected names among"):
        bl.BaselineSettings(skip=("lsr",))


# ---------------------------------------------------------------- selection and runner


def _tiny_manifest(tmp_path, size: int = 32, patients: int = 3) -> tuple:
    """Patients of 7 slices: 0 empty, 1, 2, 6 healthy heads, 3-5 heads with a FLAIR lesion."""
    root = tmp_path / "data"
    (root / "tiny").mkdir(parents=True)
    items = []
    for p in range(patients):
        rng = np.random.default_rng(p)
        slices, masks = [np.zeros((size, size))], [np.zeros((size, size), dtype=bool)]
        for k in range(1, 7):
            ph = mr_phantom(size, rng)
            if 3 <= k <= 5:
                ins = insert_flair_lesion(ph.image, ph.pixel_spacing_mm, rng, diameter_mm=40.0, contrast=0.35,
                                          placement_mask=ph.masks["brain"])
                slices.append(ins.image)
                masks.append(ins.mask)
            else:
                slices.append(ph.image)
                masks.append(np.zeros((size, size), dtype=bool))
        path = root / "tiny" / f"P{p}.npz"
        np.savez(path, flair=(np.stack(slices) * 255).round().astype(np.uint8), mask=np.stack(masks))
        items.append({"file": f"tiny/P{p}.npz", "sha256": file_sha256(path), "split": "dev", "slices": "all",
                      "labels": {"patient": f"P{p}", "lesion_slices": [3, 4, 5]}})
    rng = np.random.default_rng(99)
    healthy = np.stack([mr_phantom(size, rng).image for _ in range(8)])
    path = root / "tiny" / "T0.npz"
    np.savez(path, flair=(healthy * 255).round().astype(np.uint8), mask=np.zeros(healthy.shape, dtype=bool))
    items.append({"file": "tiny/T0.npz", "sha256": file_sha256(path), "split": "train", "slices": "all",
                  "labels": {"patient": "T0"}})
    manifest = tmp_path / "tiny.json"
    manifest.write_text(json.dumps({"schema": "klip-med-manifest", "version": 1, "name": "tiny", "modality": "MR",
                                    "array_key": "flair", "mask_key": "mask", "items": items}))
    return manifest, root


def test_selection_matches_each_tumour_slice_with_a_healthy_one(tmp_path):
    manifest_path, root = _tiny_manifest(tmp_path, size=SIZE)
    manifest = read_manifest(manifest_path, root)
    prior = tiny_prior(SIZE)
    chosen = select_slices(manifest, "dev", prior, max_patients=2, max_slices_per_patient=4, min_body_fraction=0.2)
    assert [s.patient for s in chosen] == ["P0"] * 4 + ["P2"] * 4  # evenly spaced patients: first and last
    for pat in ("P0", "P2"):
        mine = [s for s in chosen if s.patient == pat]
        ood = [s for s in mine if s.label == 1]
        ids = [s for s in mine if s.label == 0]
        assert len(ood) == 2 and len(ids) == 2
        assert all(s.lesion.sum() >= 1 for s in ood) and not any(s.lesion.any() for s in ids)
        assert {s.info["matched_to"] for s in ids} == {s.key for s in ood}
        assert all(s.info["slice"] != 0 for s in mine)  # the empty slice is never eligible
    assert all(s.image.dtype == np.float32 and s.image.min() >= -1 and s.image.max() <= 1 for s in chosen)
    with pytest.raises(KLIPMedError, match="held-out"):
        select_slices(manifest, "train", prior)
    assert slice_seed(0, "a") == slice_seed(0, "a") != slice_seed(1, "a")


def test_inserted_mode_makes_matched_pairs(tmp_path):
    manifest_path, root = _tiny_manifest(tmp_path, size=32, patients=1)
    manifest = read_manifest(manifest_path, root)
    chosen = select_slices(manifest, "dev", tiny_prior(32), max_slices_per_patient=2, lesions="inserted",
                           min_body_fraction=0.2, pixel_spacing_mm=7.5)
    assert [s.label for s in chosen] == [0, 1]
    healthy, lesioned = chosen
    assert healthy.seed_key == lesioned.seed_key and lesioned.key == healthy.key + "+lesion"
    assert lesioned.lesion.sum() >= 2 and not np.array_equal(healthy.image, lesioned.image)


def test_shift_kinds_are_matched_twins_of_healthy_slices(tmp_path):
    """Each shift kind: pairs of a lesion-free host slice and its twin with one inserted shift of
    that kind; tumour slices (3-5 of the tiny patients) never host one; a run holds one kind."""
    manifest_path, root = _tiny_manifest(tmp_path, size=32, patients=1)
    manifest = read_manifest(manifest_path, root)
    prior = tiny_prior(32)
    for kind in ("bright", "hypo", "texture", "star"):
        chosen = select_slices(manifest, "dev", prior, max_slices_per_patient=4, lesions="inserted",
                               min_body_fraction=0.2, pixel_spacing_mm=7.5, shift=kind)
        assert [s.label for s in chosen] == [0, 1, 0, 1]
        assert all(s.info["slice"] not in (3, 4, 5) for s in chosen)
        for healthy, twin in zip(chosen[::2], chosen[1::2], strict=True):
            assert twin.key == healthy.key + "+" + kind and twin.seed_key == healthy.key == healthy.seed_key
            assert twin.info["inserted"]["shift"] == kind and twin.lesion.any() and not healthy.lesion.any()
            assert twin.info["lesion_pixels"] == int(twin.lesion.sum())
            assert np.array_equal(healthy.image[~twin.lesion & (twin.image == healthy.image)],
                                  twin.image[~twin.lesion & (twin.image == healthy.image)])
    hypo = select_slices(manifest, "dev", prior, max_slices_per_patient=4, lesions="inserted", min_body_fraction=0.2,
                         pixel_spacing_mm=7.5, shift="hypo")
    assert all((t.image[t.lesion] < h.image[t.lesion]).mean() > 0.9 for h, t in zip(hypo[::2], hypo[1::2], strict=True))
    again = select_slices(manifest, "dev", prior, max_slices_per_patient=4, lesions="inserted", min_body_fraction=0.2,
                          pixel_spacing_mm=7.5, shift="hypo")
    assert all(np.array_equal(a.image, b.image) for a, b in zip(hypo, again, strict=True))  # seeded
    with pytest.raises(KLIPMedError, match="'metal' expected a CT manifest"):
        select_slices(manifest, "dev", prior, lesions="inserted", pixel_spacing_mm=7.5, shift="metal")
    with pytest.raises(KLIPMedError, match="shift: expected lesions='inserted'"):
        select_slices(manifest, "dev", prior, lesions="real", shift="hypo")
    with pytest.raises(KLIPMedError, match="shift: expected one of"):
        select_slices(manifest, "dev", prior, lesions="inserted", pixel_spacing_mm=7.5, shift="hyper")
    from klip_med.data.selection import SHIFT_KINDS
    from klip_med.eval.names import SHIFTS

    assert SHIFTS == SHIFT_KINDS  # the CLI's copy (no numpy import for --help)


def _tiny_ct_manifest(tmp_path, size: int = 64) -> tuple:
    """One CT 'patient' of 6 abdomen phantom slices in HU with their pixel spacing."""
    root = tmp_path / "data"
    (root / "ct").mkdir(parents=True)
    rng = np.random.default_rng(5)
    phantoms = [ct_phantom(size, rng) for _ in range(6)]
    path = root / "ct" / "C0.npz"
    np.savez(path, hu=np.stack([ph.image for ph in phantoms]).astype(np.float32),
             pixel_spacing_mm=np.asarray(phantoms[0].pixel_spacing_mm, dtype=np.float32))
    item = {"file": "ct/C0.npz", "sha256": file_sha256(path), "split": "dev", "slices": "all",
            "labels": {"patient": "C0"}}
    manifest = tmp_path / "ct.json"
    manifest.write_text(json.dumps({"schema": "klip-med-manifest", "version": 1, "name": "tiny-ct", "modality": "CT",
                                    "array_key": "hu", "items": [item]}))
    return manifest, root, path


def _tiny_ct_prior(size: int) -> DiffusionPrior:
    config = PriorConfig(
        name="tiny-ct", modality="CT", image_size=size, architecture=default_architecture((16, 16, 16, 16)),
        schedule=default_schedule(100), intensity=IntensityRule("ct-hu-window", hu_min=-160.0, hu_max=240.0),
        weights_dtype="float32",
    )
    return DiffusionPrior(config).eval().requires_grad_(False)


def test_inserted_ct_lesions_soft_tissue_design_is_hypodense_and_inside_soft_tissue(tmp_path):
    manifest_path, root, path = _tiny_ct_manifest(tmp_path)
    manifest, prior = read_manifest(manifest_path, root), _tiny_ct_prior(64)
    with np.load(path) as data:
        hu, spacing = data["hu"], tuple(float(v) for v in data["pixel_spacing_mm"])
    chosen = select_slices(manifest, "dev", prior, max_slices_per_patient=6, lesions="inserted")
    ood = [s for s in chosen if s.label == 1]
    assert len(ood) == 3 and [s.label for s in chosen] == [0, 1] * 3
    for s in ood:
        inserted = s.info["inserted"]
        assert inserted["design"] == "soft-tissue" and inserted["kind"] == "ct_hypo"
        assert -80.0 <= inserted["contrast"] <= -40.0 and inserted["diameter_mm"] <= 30.0
        tissue = soft_tissue_mask_ct(hu[s.info["slice"]], spacing)
        assert s.lesion.sum() >= 8 and not (s.lesion & ~tissue).any()
    first = select_slices(manifest, "dev", prior, max_slices_per_patient=6, lesions="inserted", ct_lesions="body")
    assert all(s.info["inserted"]["design"] == "body" and 10.0 <= abs(s.info["inserted"]["contrast"]) <= 60.0
               for s in first if s.label == 1)
    assert [s.key for s in first] == [s.key for s in chosen]  # same slices, other lesions
    assert not all(np.array_equal(a.lesion, b.lesion) for a, b in zip(first, chosen, strict=True))
    with pytest.raises(KLIPMedError, match="ct_lesions: expected one of"):
        select_slices(manifest, "dev", prior, lesions="inserted", ct_lesions="liver")
    metal = select_slices(manifest, "dev", prior, max_slices_per_patient=2, lesions="inserted", shift="metal")
    twin = metal[1]
    assert twin.info["inserted"]["kind"] == "metal" and twin.lesion.any() and twin.key.endswith("+metal")
    assert twin.image[twin.lesion].max() == pytest.approx(1.0)  # saturates the prior's HU window


SIZE = 16
FAST_BASELINES = bl.BaselineSettings(anoddpm_steps=2, eigen_levels=(0.3,), eigen_rank=2, eigen_iterations=2,
                                     cfs_train_slices=8, monai_timesteps=2, skip=("dlsr", "diffguard"))


def _settings() -> KLIPSettings:
    return KLIPSettings(samples=2, steps=3, block_size=4, top_k=2, seed=3)


WINDOWS = ("full", "t:0,0.3", "t:0.3,0.6", "t:0.6,1")
"""A 3-step run holds a step in each of these (the run's own ten windows need more steps)."""


def _run(manifest, root, out, prior, max_slices=4, **kw):
    kw.setdefault("baselines", FAST_BASELINES)
    kw.setdefault("windows", WINDOWS)
    return run_benchmark(manifest, root, prior, "mri:accel=2,center=0.25,noise=0.01", "dev", _settings(), 2,
                         max_slices, out, n_boot=50, min_body_fraction=0.2, log=None, **kw)


def _without_costs(methods: dict) -> dict:
    return {name: {k: v for k, v in m.items() if k not in ("cost", "default")} for name, m in methods.items()}


def test_runner_end_to_end_resumes_and_is_deterministic(tmp_path, monkeypatch):
    from dataclasses import replace

    from klip_med.eval.runner import _windows
    from klip_med.eval.slice_run import process_slice

    DEFAULT_WINDOWS = WINDOWS

    manifest, root = _tiny_manifest(tmp_path, size=SIZE)
    prior = tiny_prior(SIZE)
    out = tmp_path / "run"
    results = _run(manifest, root, out, prior, block_sizes=[4, 8])
    assert results["counts"] == {"images": 8, "ood": 4, "id": 4, "patients": 2, "computed_now": 8, "missing": 0}
    names = list(results["methods"])
    for w in DEFAULT_WINDOWS:
        assert f"klip[{w}]" in names and f"klip_paper[{w}]" in names
    for b in ("posterior_std", "residual", "anoddpm", "eigenscore", "cfs", "monai_likelihood", "brightness",
              "brightness_dev", "centrality", "eigenscore_lambda1"):
        assert b in names
    for name, m in results["methods"].items():
        assert 0 <= m["dataset"]["auroc"] <= 1, name
        if name != "eigenscore_lambda1":
            assert m["localisation"]["n_images"] + m["localisation"]["n_skipped"] == 4
    assert results["methods"]["klip[full]"]["cost"]["nfe_per_image"] == 3 * 2
    assert results["methods"]["anoddpm"]["cost"]["extra_nfe_per_image"] == 2
    assert results["methods"]["brightness"]["cost"]["nfe_per_image"] == 0
    assert "localisation_auroc" in results["methods"]["klip[full]"]["vs"]["brightness"]
    for f in ("results.json", "results.md", "results_roc_dataset.png", "results_b8.json", "results_b8.md"):
        assert (out / f).is_file(), f
    report = (out / "results.md").read_text()
    assert "| klip[full] |" in report and "| method | dataset AUROC - posterior_std | dataset AUROC - brightness |" in report
    diff = results["methods"]["klip[full]"]["vs"]["brightness"]["dataset_auroc"]
    assert f"{diff['mean']:+.3f}" in report.split("Dataset level, paired differences")[1]
    assert json.loads((out / "results.json").read_text())["benchmark"]["block_size"] == 4

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached slice was sampled again")

    monkeypatch.setattr("klip_med.pipeline.reconstruct_measurement", no_sampling)
    again = _run(manifest, root, out, prior)
    assert again["counts"]["computed_now"] == 0
    assert _without_costs(again["methods"]) == _without_costs(results["methods"])

    # null-calibrated rows from the cache: leave-one-patient-out, then a model file fitted on the run
    lopo = _run(manifest, root, out, prior, null="lopo", null_windows=["t:0.3,0.6"])
    assert "klip_z[t:0.3,0.6]" in lopo["methods"] and lopo["counts"]["computed_now"] == 0
    assert _without_costs(lopo["methods"])["klip[full]"] == _without_costs(results["methods"])["klip[full]"]
    from klip_med.calibration.conditions import null_conditions
    from klip_med.eval.nulls import null_from_eval_run
    from klip_med.priors.identity import prior_identity

    settings = replace(_settings(), windows=_windows(DEFAULT_WINDOWS, prior, 3))
    window = settings.windows[DEFAULT_WINDOWS.index("t:0.3,0.6")]
    conditions = null_conditions(prior, "mri:accel=2,center=0.25,noise=0.01", settings, [window],
                                 prior_identity(prior)["weights_sha256"])
    conditions["block_size"] = 4
    model = null_from_eval_run(out, ["t:0.3,0.6"], 4, conditions)
    assert model.n_images == 4 and model.conditions["windows"][0]["name"] == "t:0.3,0.6"
    two = _run(manifest, root, out, prior, null="lopo", null_windows=["t:0.3,0.6", "t:0.6,1"],
               block_sizes=[4, 2, 8])
    name = "klip_z[2 windows t:0.3,0.6..t:0.6,1]"
    assert name in two["methods"]
    fine = json.loads((out / "results_b2.json").read_text())  # lopo refits for every block size
    assert name in fine["methods"] and fine["benchmark"]["block_size"] == 2
    assert name in json.loads((out / "results_b8.json").read_text())["methods"]  # refitted at 8x8 too
    model.save(tmp_path / "null.json")
    with pytest.raises(KLIPMedError, match="expected a model fitted on other images than the ones scored, found 4"):
        _run(manifest, root, out, prior, null=tmp_path / "null.json", block_sizes=[4])  # refused before sampling

    # a model fitted on one patient's lesion-free slices scores the other patient's as fresh images,
    # and, only when allowed, its own calibration images apart
    from klip_med.calibration.fit import fit_null
    from klip_med.eval.cache import read_slice as read_cached
    from klip_med.eval.nulls import cached_blocks

    cached = [read_cached(p) for p in sorted((out / "slices").glob("*.npz"))]
    own = [e for e in cached if e.label == 0 and e.patient == cached[0].patient]
    d, c, i = zip(*(cached_blocks(e, ["t:0.3,0.6"], 4) for e in own), strict=True)
    half = fit_null(d, c, i, conditions, "one patient", "none", fingerprints=[e.meta["info"]["source"] for e in own])
    half.save(tmp_path / "half.json")
    with_file = _run(manifest, root, out, prior, null=tmp_path / "half.json", block_sizes=[4],
                     allow_calibration_overlap=True)
    assert with_file["default_method"] == "klip_z[t:0.3,0.6]" and with_file["methods"]["klip_z[t:0.3,0.6]"]["default"]
    cal = with_file["null_calibration"]
    assert cal["n_images"] == 2 and cal["overlapping"]["n_images"] == len(own) == 2
    assert set(cal["rates"]) == {"0.01", "0.05"} and set(cal) >= {"rates", "slice", "volume"}
    assert all(0 <= r["observed"] <= 1 for level in ("slice", "volume") for r in cal[level].values())
    assert cal["volume"]["fwer:0.05"]["n"] == 1  # one fresh patient
    report = (out / "results.md").read_text()
    assert "**klip_z[t:0.3,0.6]** (default)" in report and "healthy slices flagged" in report
    assert "calibration images of the model" in report
    model.conditions["physics"] = "mri:accel=8"
    model.save(tmp_path / "other.json")
    with pytest.raises(KLIPMedError, match="physics: fitted 'mri:accel=8'"):
        _run(manifest, root, out, prior, null=tmp_path / "other.json", block_sizes=[4])
    monkeypatch.undo()

    # determinism: the first slice computed afresh (sampling run, then the post-hoc baselines from its
    # posterior mean) equals its cached maps bit for bit
    from klip_med.data.selection import select_slices as select
    from klip_med.eval.cache import CachedSlice
    from klip_med.eval.posthoc import PostHoc

    read = read_manifest(manifest, root)
    first = select(read, "dev", prior, 2, 4, seed=3, min_body_fraction=0.2)[0]
    settings = replace(_settings(), windows=_windows(DEFAULT_WINDOWS, prior, 3))
    post = PostHoc(read, prior, None, "mri:accel=2,center=0.25,noise=0.01", {}, "", FAST_BASELINES,
                   torch.device("cpu"), 3, 0.2)
    maps, meta, body, images = process_slice(prior, "mri:accel=2,center=0.25,noise=0.01", first, settings,
                                             post.in_run, torch.device("cpu"))
    _, fresh, added = post.complete(CachedSlice(first.key, first.patient, first.label, maps, first.lesion, body,
                                                images, meta), "stamp")
    assert added == ["anoddpm", "eigenscore", "cfs", "monai_likelihood"]
    cached = read_slice(slice_path(out / "slices", first.key))
    assert set(fresh.maps) == set(cached.maps)
    assert all(np.array_equal(fresh.maps[n], cached.maps[n]) for n in fresh.maps)


def test_runner_recomputes_a_slice_when_settings_change(tmp_path):
    manifest, root = _tiny_manifest(tmp_path, size=SIZE, patients=1)
    prior = tiny_prior(SIZE)
    out = tmp_path / "run"
    cheap = bl.BaselineSettings(skip=bl.POST_HOC)
    _run(manifest, root, out, prior, max_slices=2, windows=("full",), baselines=cheap)
    changed = _run(manifest, root, out, prior, max_slices=2, windows=("full", "t:0,0.3"), baselines=cheap)
    assert changed["counts"]["computed_now"] == 2
    with pytest.raises(KLIPMedError, match="windows"):
        _run(manifest, root, out, prior, windows=("sigma:100,200",))
    with pytest.raises(KLIPMedError, match="dlsr: its companion model lives in the prior's folder"):
        _run(manifest, root, out, prior, baselines=bl.BaselineSettings())  # before any sampling


def test_readouts_keep_each_window_total_and_enter_the_fingerprint(tmp_path):
    manifest, root = _tiny_manifest(tmp_path, size=SIZE, patients=1)
    prior = tiny_prior(SIZE)
    out = tmp_path / "run"
    cheap = bl.BaselineSettings(skip=bl.POST_HOC)
    plain = _run(manifest, root, out, prior, max_slices=2, baselines=cheap)
    assert not any(name.startswith(("klip_dn[", "klip_t[")) for name in plain["methods"])
    with_readouts = _run(manifest, root, out, prior, max_slices=2, baselines=cheap, readouts=("tstat", "denoised"))
    assert with_readouts["counts"]["computed_now"] == 2  # other read-outs: sampled again
    for path in sorted((out / "slices").glob("*.npz")):
        entry = read_slice(path)
        for w in WINDOWS:
            # an attribution, not a new divergence: the same KL per window, split otherwise over pixels
            klip, denoised = entry.maps[f"klip[{w}]"], entry.maps[f"klip_dn[{w}]"]
            assert denoised.sum() == pytest.approx(float(klip.sum()), rel=1e-4)
            assert (denoised >= 0).all()
            assert np.isfinite(entry.maps[f"klip_t[{w}]"]).all()
        assert entry.meta["sampling"]["readouts"]["extra_network_calls_per_image"] > 0
    again = _run(manifest, root, out, prior, max_slices=2, baselines=cheap, readouts=("denoised", "tstat"))
    assert again["counts"]["computed_now"] == 0  # order does not matter
    assert "klip_dn[full]" in again["methods"] and "klip_t[full]" in again["methods"]
    with pytest.raises(KLIPMedError, match="readouts: expected some of"):
        _run(manifest, root, out, prior, max_slices=2, baselines=cheap, readouts=("gradient",))


def test_a_failed_slice_is_reported_the_others_are_cached_and_a_rerun_samples_only_it(tmp_path, monkeypatch):
    manifest, root = _tiny_manifest(tmp_path, size=SIZE, patients=1)
    prior = tiny_prior(SIZE)
    out = tmp_path / "run"
    cheap = bl.BaselineSettings(skip=bl.POST_HOC)
    import klip_med.pipeline as pipeline_module

    real = pipeline_module.reconstruct_measurement
    calls = []

    def fails_once(prior_, physics, y, settings, observers=()):
        calls.append(settings.seed)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(prior_, physics, y, settings, observers=observers)

    monkeypatch.setattr("klip_med.pipeline.reconstruct_measurement", fails_once)
    with pytest.raises(KLIPMedError, match=r"1 of 4 slices failed \(3 cached for a rerun\); first: .*out of memory"):
        _run(manifest, root, out, prior, max_slices=4, baselines=cheap)
    assert len(list((out / "slices").glob("*.npz"))) == 3
    rerun = _run(manifest, root, out, prior, max_slices=4, baselines=cheap)
    assert rerun["counts"]["computed_now"] == 1 and len(calls) == 5


def test_eval_parser_registers_every_option():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    args = parser.parse_args(["eval", "--manifest", "m.json", "--prior", "p", "--physics", "mri:accel=4",
                              "--split", "test", "--samples", "2", "--steps", "10", "--sampler", "dps",
                              "--max-patients", "2", "--max-slices", "2", "--out", "o", "--seed", "1",
                              "--device", "cpu", "--block-size", "4,8", "--skip", "eigenscore"])
    assert args.split == "test" and args.block_size == [4, 8] and args.skip == ["eigenscore"]
    assert args.max_patients == 2 and args.max_slices == 2 and callable(args.run)
    defaults = parser.parse_args(["eval", "--manifest", "m.json", "--prior", "p", "--physics", "mri:accel=4",
                                  "--out", "o", "--lesions", "inserted", "--shift", "texture", "--skip", "dlsr",
                                  "diffguard", "monai_likelihood"])
    assert defaults.shift == "texture" and defaults.skip == ["dlsr", "diffguard", "monai_likelihood"]
    settings = bl.BaselineSettings()
    for flag in ("anoddpm_t", "anoddpm_steps", "eigen_rank", "eigen_iterations", "cfs_train_slices", "diffguard_t",
                 "diffguard_steps", "diffguard_scale", "monai_timesteps"):
        assert getattr(defaults, flag) == getattr(settings, flag), flag  # the CLI's defaults are the settings'


def test_eval_defaults_are_those_of_run():
    """`klip-med eval` measures the map `klip-med run` makes: same sampler defaults, same windows,
    the shipped null model (auto)."""
    from klip_med.cli.common import RUN_DEFAULTS
    from klip_med.eval.names import DEFAULT_WINDOWS
    from klip_med.pipeline import RUN_WINDOWS

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "--manifest", "m.json", "--prior", "p", "--physics", "mri:accel=4", "--out", "o"])
    assert args.null == "auto" and args.windows is None and args.block_size == [RUN_DEFAULTS["block_size"]]
    assert DEFAULT_WINDOWS == RUN_WINDOWS
    from klip_med.cli.common import settings_from_args
    from klip_med.cli.eval import EVAL_DEFAULTS

    assert settings_from_args(args, EVAL_DEFAULTS) == KLIPSettings()  # run's settings, windows aside


def test_roc_figure_draws_the_headline_rows_and_every_baseline(tmp_path):
    from klip_med.eval.results import _shown_in_figure, roc_figure

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    names = ["klip_z[9 windows]", "klip[full]", "klip_paper[full]", "klip[t:0.1,0.2]", "klip_paper[t:0.3,1]",
             "posterior_std", "brightness", "centrality"]
    curves = {n: (rng.random(100) + labels * k / 8, labels) for k, n in enumerate(names)}
    assert [n for n in names if _shown_in_figure(n)] == [n for n in names if n not in
                                                         ("klip[t:0.1,0.2]", "klip_paper[t:0.3,1]")]
    path = roc_figure(curves, tmp_path / "roc.png", "a title " * 30)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert roc_figure({"brightness": (rng.random(10), np.zeros(10))}, tmp_path / "none.png", "t") is None
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------- intervals with few patients


def _records(patients: int, per: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.tile(np.repeat([0, 1], per // 2), patients)
    scores = rng.random(labels.size) + 0.6 * labels
    units = np.repeat([f"P{k}" for k in range(patients)], per)
    return scores, labels, units


def test_intervals_need_five_patients_and_per_patient_values_replace_them():
    from sklearn.metrics import roc_auc_score

    scores, labels, units = _records(3)
    few = mt.dataset_level(scores, labels, units, n_boot=200)
    assert few["auroc_ci"] == [None, None] and few["auprc_ci"] == [None, None]
    assert few["interval"] == "none: 3 patients (< 5); per-patient values instead" and few["bootstrap_valid"] == 0
    assert few["auroc"] == pytest.approx(roc_auc_score(labels, scores))  # the point estimate stays
    for p in ("P0", "P1", "P2"):
        own = units == p
        assert few["per_patient"][p]["auroc"] == pytest.approx(roc_auc_score(labels[own], scores[own]), abs=1e-6)
    scores5, labels5, units5 = _records(5)
    enough = mt.dataset_level(scores5, labels5, units5, n_boot=200)
    assert enough["interval"] is None and "per_patient" not in enough
    assert enough["auroc_ci"][0] <= enough["auroc"] <= enough["auroc_ci"][1]
    one_class = np.array([0, 0, 1, 1, 0, 0])  # P1 holds ID images only: no AUROC of its own
    per = mt.dataset_level(np.arange(6.0), one_class, ["P0"] * 4 + ["P1"] * 2)["per_patient"]
    assert per["P0"]["auroc"] == 1.0 and per["P1"]["auroc"] is None
    locs = [mt.Localisation(v, v, 10, 2) for v in (0.9, 0.7, 0.5)]
    loc = mt.localisation_level(locs, ["A", "A", "B"], n_boot=100)
    assert loc["auroc_ci"] == [None, None] and loc["auroc"] == pytest.approx(0.7)
    assert loc["per_patient"] == {"A": {"auroc": 0.8, "auprc": 0.8, "n_images": 2},
                                  "B": {"auroc": 0.5, "auprc": 0.5, "n_images": 1}}
    diff = mt.paired_difference([0.9, 0.7, 0.5], [0.5, 0.5, 0.5], ["A", "A", "B"], n_boot=100)
    assert diff["ci"] == [None, None] and diff["per_patient"] == {"A": pytest.approx(0.3), "B": 0.0}
    with_five = mt.paired_difference(np.arange(10.0), np.zeros(10), [f"P{k // 2}" for k in range(10)], n_boot=100)
    assert with_five["interval"] is None and with_five["ci"][0] is not None


def test_results_page_says_there_is_no_interval_and_lists_patients():
    from klip_med.eval.results import markdown_report

    scores, labels, units = _records(2)
    dataset = mt.dataset_level(scores, labels, units)
    results = {"benchmark": {"manifest": "m", "split": "dev", "physics": "p", "prior": "x", "block_size": 8,
                             "lesions": "real", "device": "cpu", "n_boot": 1000, "seed": 0,
                             "settings": {"sampler": "fast", "steps": 3, "samples": 2, "top_k": 5}},
               "counts": {"images": 12, "ood": 6, "id": 6, "patients": 2},
               "sampling": {"nfe_per_image": 6, "seconds_per_image": 0.1},
               "methods": {"brightness": {"dataset": dataset, "localisation": None,
                                          "cost": {"nfe_per_image": 0, "seconds_per_image": 0.0}}}}
    page = markdown_report(results)
    per = [dataset["per_patient"][p]["auroc"] for p in ("P0", "P1")]
    assert "intervals: **none** (2 patients, fewer than 5" in page
    assert f"{dataset['auroc']:.3f} (per patient {per[0]:.3f} / {per[1]:.3f})" in page


# ---------------------------------------------------------------- MONAI likelihood baseline


def test_monai_likelihood_map_is_largest_where_the_image_leaves_the_prior():
    from klip_med.eval.monai_likelihood import likelihood_kl_maps
    from klip_med.eval.prior_maps import scheduler_of

    prior = _gaussian_prior(np.full((16, 16), 0.01))
    x = torch.zeros(16, 16)
    x[8:12, 4:8] = 3.0  # 30 prior standard deviations (at t = 1 every pixel's term is chi-square noise of mean ~0.5)
    m, nfe, info = bl.monai_likelihood_map(prior, x, torch.Generator().manual_seed(0), n_timesteps=10)
    assert nfe == 10 and info["timesteps"] == [1, 999, 10] and m.shape == (16, 16)
    blocks = m.reshape(4, 4, 4, 4).mean(dim=(1, 3))
    assert np.unravel_index(int(torch.argmax(blocks)), (4, 4)) == (2, 1)
    direct = likelihood_kl_maps(lambda xt, t: prior.eps(xt, t.float()), scheduler_of(prior), x[None, None],
                                torch.Generator().manual_seed(0), [int(v) for v in np.linspace(1, 999, 10).round()])
    assert torch.equal(m, direct.maps.mean(dim=0)[0, 0])  # the MONAI terms themselves, averaged


# ---------------------------------------------------------------- the cache: sampling run and post-hoc baselines


def _prior_with_companions(tmp_path, size: int = SIZE):
    """The tiny prior saved as a folder, with (untrained) dlsr and diffguard companions beside it."""
    from klip_med.eval.diffguard import save_diffguard
    from klip_med.eval.dlsr import save_dlsr
    from klip_med.priors.diffusion import load_prior_dir, save_prior_dir

    prior = tiny_prior(size)
    folder = save_prior_dir(prior, prior.config, tmp_path / "prior")
    loaded = load_prior_dir(folder)
    dlsr, classifier = untrained_companions(loaded)
    save_dlsr(dlsr, folder / "dlsr", loaded, {"note": "untrained, for tests"})
    save_diffguard(classifier, folder / "diffguard", loaded, {"note": "untrained, for tests"})
    return str(folder), loaded


def test_adding_a_baseline_to_a_cached_run_does_not_sample_again(tmp_path, monkeypatch):
    from dataclasses import replace

    manifest, root = _tiny_manifest(tmp_path, size=SIZE, patients=1)
    prior, _ = _prior_with_companions(tmp_path)
    out = tmp_path / "run"
    few = replace(FAST_BASELINES, skip=("eigenscore", "cfs", "dlsr", "diffguard", "monai_likelihood"))
    more = replace(FAST_BASELINES, skip=("eigenscore", "cfs"), diffguard_steps=2)
    first = _run(manifest, root, out, prior, max_slices=2, windows=("full",), baselines=few)
    assert first["counts"]["computed_now"] == 2 and "dlsr" not in first["methods"]
    before = {p.name: read_slice(p) for p in (out / "slices").glob("*.npz")}

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached slice was sampled again")

    monkeypatch.setattr("klip_med.pipeline.reconstruct_measurement", no_sampling)
    second = _run(manifest, root, out, prior, max_slices=2, windows=("full",), baselines=more)
    assert second["counts"]["computed_now"] == 0
    for name in ("dlsr", "diffguard", "monai_likelihood", "diffguard_level_kl"):
        assert name in second["methods"], name
    assert second["methods"]["diffguard"]["cost"]["extra_nfe_per_image"] == 2
    assert _without_costs(second["methods"])["klip[full]"] == _without_costs(first["methods"])["klip[full]"]
    for p in (out / "slices").glob("*.npz"):
        after = read_slice(p)
        assert all(np.array_equal(after.maps[n], m) for n, m in before[p.name].maps.items())  # KLIP kept
        assert set(after.meta["post_hoc"]) == {"anoddpm", "dlsr", "diffguard", "monai_likelihood"}

    def no_baselines(*args, **kwargs):
        raise AssertionError("an up-to-date post-hoc baseline was computed again")

    monkeypatch.setattr("klip_med.eval.posthoc.post_hoc_baselines", no_baselines)
    third = _run(manifest, root, out, prior, max_slices=2, windows=("full",), baselines=more)
    assert _without_costs(third["methods"]) == _without_costs(second["methods"])
    hidden = _run(manifest, root, out, prior, max_slices=2, windows=("full",), baselines=few)
    assert "dlsr" not in hidden["methods"] and "diffguard_level_kl" not in hidden["methods"]  # skipped: not shown
    assert all("dlsr" in read_slice(p).maps for p in (out / "slices").glob("*.npz"))  # ... but kept
    monkeypatch.undo()
    fresh = tmp_path / "fresh"  # the same baselines computed with the sampling run: equal bit for bit
    _run(manifest, root, fresh, prior, max_slices=2, windows=("full",), baselines=more)
    for p in (out / "slices").glob("*.npz"):
        a, b = read_slice(p), read_slice(fresh / "slices" / p.name)
        assert set(a.maps) == set(b.maps) and all(np.array_equal(a.maps[n], b.maps[n]) for n in a.maps)


def test_a_cache_of_the_previous_version_keeps_its_sampling_run(tmp_path, monkeypatch):
    """A slice file whose fingerprint is the cache-version-2 one (every baseline setting, the skip
    list ["eigenscore"], the training files) is recognised: nothing is sampled; its post-hoc
    baselines are recomputed and the file is rewritten with today's fingerprint."""
    from dataclasses import replace

    from klip_med.eval.cache import fingerprint, write_slice
    from klip_med.eval.runner import _windows
    from klip_med.priors.identity import prior_identity

    manifest, root = _tiny_manifest(tmp_path, size=SIZE, patients=1)
    prior = tiny_prior(SIZE)
    out = tmp_path / "run"
    _run(manifest, root, out, prior, max_slices=2, windows=("full",))
    read = read_manifest(manifest, root)
    sampling = {k: v for k, v in replace(_settings(), windows=_windows(("full",), prior, 3)).describe().items()
                if k not in ("top_k", "block_size")}
    d = FAST_BASELINES.describe()
    old = {"physics": "mri:accel=2,center=0.25,noise=0.01", "settings": sampling, "prior":
           prior_identity(prior)["weights_sha256"], "version": 2,
           "baselines": {**{k: d[k] for k in ("anoddpm_t", "anoddpm_steps", "eigen_levels", "eigen_rank",
                                              "eigen_iterations", "eigen_fd", "cfs_train_slices", "cfs_t")},
                         "skip": ["eigenscore"]},
           "train_files": sorted({item.sha256 for item in read.split("train")})}
    for item in select_slices(read, "dev", prior, 2, 2, seed=3, min_body_fraction=0.2):
        path = slice_path(out / "slices", item.key)
        entry = read_slice(path)
        meta = {k: v for k, v in entry.meta.items() if k not in ("post_hoc",)}
        meta["fingerprint"] = fingerprint({**old, "key": item.key, "seed_key": item.seed_key}, (item.image, item.lesion))
        write_slice(path, replace(entry, meta=meta, maps={k: v for k, v in entry.maps.items() if k != "anoddpm"}))

    def no_sampling(*args, **kwargs):
        raise AssertionError("a version-2 slice was sampled again")

    monkeypatch.setattr("klip_med.pipeline.reconstruct_measurement", no_sampling)
    again = _run(manifest, root, out, prior, max_slices=2, windows=("full",))
    assert again["counts"]["computed_now"] == 0 and "anoddpm" in again["methods"]
    for p in (out / "slices").glob("*.npz"):
        entry = read_slice(p)
        assert set(entry.meta["post_hoc"]) == {"anoddpm", "eigenscore", "cfs", "monai_likelihood"}
        assert entry.meta["fingerprint"] != meta["fingerprint"]  # rewritten with today's
    other = replace(FAST_BASELINES, anoddpm_t=0.3)  # a settings change of a post-hoc baseline: recomputed, not sampled
    changed = _run(manifest, root, out, prior, max_slices=2, windows=("full",), baselines=other)
    assert changed["counts"]["computed_now"] == 0


@pytest.mark.slow
def test_eval_and_calibrate_on_ray_workers_equal_the_local_run(tmp_path):
    """Two Ray workers sample the slices (and the calibration images) in any order; the cache, the
    results and the null model are those of the run in this process."""
    ray = pytest.importorskip("ray")
    from dataclasses import replace

    from klip_med.pipeline import parse_window
    from klip_med.pipeline.calibrate import calibrate_images
    from klip_med.pipeline.engine import EngineOptions

    manifest, root = _tiny_manifest(tmp_path, size=SIZE)
    prior = tiny_prior(SIZE)
    cheap = bl.BaselineSettings(skip=("eigenscore", "dlsr", "diffguard", "monai_likelihood"))
    local = _run(manifest, root, tmp_path / "local", prior, baselines=cheap)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        engine = EngineOptions("ray", workers=2)
        remote = _run(manifest, root, tmp_path / "ray", prior, baselines=cheap, engine=engine)
        assert remote["counts"]["computed_now"] == local["counts"]["computed_now"] == 8
        assert _without_costs(remote["methods"]) == _without_costs(local["methods"])
        for path in sorted((tmp_path / "local" / "slices").glob("*.npz")):
            a, b = read_slice(path), read_slice(tmp_path / "ray" / "slices" / path.name)
            for name in a.maps:
                np.testing.assert_array_equal(a.maps[name], b.maps[name], err_msg=f"{path.name}: {name}")
        rng = np.random.default_rng(0)
        images = [2 * mr_phantom(SIZE, rng).image - 1 for _ in range(3)]
        windows = tuple(parse_window(w, prior.alphas_cumprod) for w in WINDOWS)
        settings = replace(_settings(), windows=windows)
        here = calibrate_images(prior, "mri:accel=2,center=0.25,noise=0.01", settings, images, "phantoms",
                                conditioning="none", log=None)
        there = calibrate_images(prior, "mri:accel=2,center=0.25,noise=0.01", settings, images, "phantoms",
                                 conditioning="none", log=None, engine=engine)
        np.testing.assert_array_equal(here.mean, there.mean)
        np.testing.assert_array_equal(here.std, there.std)
    finally:
        ray.shutdown()
