"""DLSR (klip_med.eval.dlsr): the feature-space denoiser finds what ID features do not contain,
per location and per layer; trained on a tiny prior it scores maps, saves and loads exactly, and
is refused for another prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klip_med.data.phantom import mr_phantom
from klip_med.errors import KLIPMedError
from klip_med.eval.companions import companion_dir
from klip_med.eval.dlsr import DLSR, alpha_bar, fit_denoiser, load_dlsr, save_dlsr, train_dlsr
from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
from klip_med.priors.diffusion import DiffusionPrior
from klip_med.priors.intensity import IntensityRule


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _subspace_model(dim: int = 12, rank: int = 3, seed: int = 0):
    """A DLSR model trained on vectors of a ``rank``-dim subspace (plus 5 % noise): it knows the
    subspace, so a vector outside it reconstructs badly. Returns (model, basis, sampler, generator)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, rank, generator=g)

    def sample(n: int) -> torch.Tensor:
        return torch.randn(n, rank, generator=g) @ basis.T + 0.05 * torch.randn(n, dim, generator=g)

    train = sample(4000)
    mean, std = train.mean(0), train.std(0)
    net, losses = fit_denoiser((train - mean) / std, g, steps=400, batch=256, lr=3e-3, hidden=64, depth=2)
    assert np.mean(losses[-40:]) < 0.5 * np.mean(losses[:40])  # it learnt something
    return DLSR(net, mean, std, (4, 4, 4)), basis, sample, g


def _off_subspace(basis: torch.Tensor, n: int, norm: float, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.cat([basis, torch.randn(basis.shape[0], basis.shape[0] - basis.shape[1],
                                                           generator=g)], dim=1))
    v = q[:, basis.shape[1]:] @ torch.randn(basis.shape[0] - basis.shape[1], n, generator=g)
    return (v / v.norm(dim=0) * norm).T  # (n, D), orthogonal to the ID subspace, ID-like norm


def test_schedule_runs_from_clean_to_noise():
    u = torch.linspace(0, 1, 11)
    a = alpha_bar(u)
    assert float(a[0]) == pytest.approx(1.0) and float(a[-1]) == pytest.approx(1e-5)
    assert bool((a[1:] < a[:-1]).all())


def test_dlsr_finds_a_feature_outlier_planted_in_one_block():
    """An 8 x 8 map of ID feature vectors with one 2 x 2 block replaced by vectors of the same norm
    outside the ID subspace: the block with the largest mean error is that block, by a wide margin."""
    model, basis, sample, g = _subspace_model()
    grid = sample(64).T.reshape(12, 8, 8).clone()
    norm = float(grid.reshape(12, -1).norm(dim=0).mean())
    grid[:, 4:6, 2:4] = _off_subspace(basis, 4, norm, g).T.reshape(12, 2, 2)
    err = model.score_vectors(grid.reshape(12, -1).T, torch.Generator().manual_seed(1)).mean(dim=1)
    blocks = err.reshape(4, 2, 4, 2).mean(dim=(1, 3))
    assert np.unravel_index(int(blocks.argmax()), (4, 4)) == (2, 1)
    others = torch.cat([blocks.flatten()[:9], blocks.flatten()[10:]])
    assert float(blocks[2, 1]) > 2.5 * float(others.max())
    again = model.score_vectors(grid.reshape(12, -1).T, torch.Generator().manual_seed(1)).mean(dim=1)
    assert torch.equal(err, again)  # same generator, same numbers


def test_dlsr_error_is_layer_wise():
    """An outlier confined to the channels of the second layer raises that layer's error most."""
    model, basis, sample, g = _subspace_model(seed=1)
    x = sample(200)
    bad = x.clone()
    bad[:, 4:8] += 3.0 * x[:, 4:8].std(dim=0)  # a shift of layer 2 only, off the joint subspace
    e_id = model.score_vectors(x, torch.Generator().manual_seed(2)).mean(dim=0)
    e_bad = model.score_vectors(bad, torch.Generator().manual_seed(2)).mean(dim=0)
    excess = e_bad - e_id
    assert int(excess.argmax()) == 1 and float(excess[1]) > 3 * float(excess[[0, 2]].abs().max())


def tiny_prior(size: int = 32) -> DiffusionPrior:
    config = PriorConfig(
        name="tiny", modality="MR", image_size=size, architecture=default_architecture((16, 16, 16, 16)),
        schedule=default_schedule(100), intensity=IntensityRule("mr-percentile", percentile=99.0, reference=0.8),
        weights_dtype="float32",
    )
    torch.manual_seed(0)  # test-only: the network's random initialisation
    return DiffusionPrior(config).eval().requires_grad_(False)


def test_train_dlsr_on_a_tiny_prior_scores_maps_and_round_trips(tmp_path):
    prior = tiny_prior(32)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.stack([2 * mr_phantom(32, rng).image - 1 for _ in range(10)]))[:, None]
    model, record = train_dlsr(prior, images, torch.Generator().manual_seed(0), steps=30, batch=64, hidden=32, depth=1)
    assert model.layer_channels == (16, 16, 16) and model.mean.numel() == 48
    assert record["steps_trained"] == 30 and record["heldout_slices"] == 1 and record["train_slices"] == 9
    assert np.isfinite(record["final_loss"]) and record["heldout_locations"] > 0
    image = images[0, 0]
    m, info = model.score_map(prior, image, torch.Generator().manual_seed(3))
    assert m.shape == (32, 32) and bool(torch.isfinite(m).all()) and len(info["layer_error"]) == 3
    save_dlsr(model, tmp_path / "dlsr", prior, record)
    loaded = load_dlsr(tmp_path / "dlsr", prior)
    assert torch.equal(loaded.mean, model.mean) and torch.equal(loaded.std, model.std)  # statistics stay float32
    m2, _ = loaded.score_map(prior, image, torch.Generator().manual_seed(3))
    assert torch.allclose(m2, m, rtol=1e-2, atol=1e-3)  # float16 network weights
    other = tiny_prior(32)
    with torch.no_grad():
        next(iter(other.unet.parameters())).add_(1.0)  # another prior: other weights
    with pytest.raises(KLIPMedError, match="a companion trained for this prior"):
        load_dlsr(tmp_path / "dlsr", other)
    with pytest.raises(KLIPMedError, match="klip-med train-baseline --kind dlsr"):
        load_dlsr(tmp_path / "none", prior)


def test_companions_of_shipped_priors_live_in_their_folders():
    from klip_med.priors.registry import available

    for name, folder in available().items():
        assert companion_dir(name, "dlsr") == folder / "dlsr"
    with pytest.raises(KLIPMedError, match="kind: expected one of"):
        companion_dir(next(iter(available())), "other")


def _phantom_manifest(tmp_path, size: int = 32):
    """Two MR 'patients' of 8 phantom slices: one train, one dev (no lesions)."""
    import json

    from klip_med.data.manifest import file_sha256

    root = tmp_path / "data"
    (root / "ph").mkdir(parents=True)
    items = []
    for k, split in enumerate(("train", "dev")):
        rng = np.random.default_rng(k)
        stack = np.stack([mr_phantom(size, rng).image for _ in range(8)])
        path = root / "ph" / f"V{k}.npz"
        np.savez(path, flair=(stack * 255).round().astype(np.uint8), mask=np.zeros(stack.shape, bool))
        items.append({"file": f"ph/V{k}.npz", "sha256": file_sha256(path), "split": split, "slices": "all",
                      "labels": {"patient": f"V{k}"}})
    manifest = tmp_path / "ph.json"
    manifest.write_text(json.dumps({"schema": "klip-med-manifest", "version": 1, "name": "ph", "modality": "MR",
                                    "array_key": "flair", "mask_key": "mask", "items": items}))
    return manifest, root


def test_train_baseline_command_writes_companions_eval_finds(tmp_path, capsys):
    from klip_med.cli import main
    from klip_med.eval.diffguard import load_diffguard
    from klip_med.priors.diffusion import load_prior_dir, save_prior_dir

    manifest, root = _phantom_manifest(tmp_path)
    prior = tiny_prior(32)
    folder = save_prior_dir(prior, prior.config, tmp_path / "prior")
    common = ["--prior", str(folder), "--manifest", str(manifest), "--data-root", str(root), "--steps", "3",
              "--batch", "16"]
    assert main(["train-baseline", "--kind", "dlsr", *common, "--slices", "4"]) == 0
    assert main(["train-baseline", "--kind", "diffguard", *common, "--levels", "3"]) == 0
    loaded = load_prior_dir(folder)
    model = load_dlsr(companion_dir(str(folder), "dlsr"), loaded)
    classifier, config = load_diffguard(companion_dir(str(folder), "diffguard"), loaded)
    assert model.mean.numel() == 48 and classifier.n_levels == 3
    assert config["training"]["split"] == "train" and config["training"]["steps_trained"] == 3
    assert set(config["training"]["accuracy"]) == {"train", "dev"}  # measured on the dev split, never trained on
    assert "wrote" in capsys.readouterr().out
