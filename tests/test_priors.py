"""Learned priors: shipped priors load offline and sample; configs and weights are validated;
training resumes exactly; the CLI trains a tiny prior from a manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from klip_med import priors
from klip_med.cli import main as cli_main
from klip_med.data.manifest import file_sha256
from klip_med.data.phantom import ct_phantom, mr_phantom
from klip_med.errors import KLIPMedError
from klip_med.physics import parse_physics
from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
from klip_med.priors.diffusion import DiffusionPrior, load_prior_dir, save_prior_dir
from klip_med.priors.intensity import ABDOMEN_WINDOW, IntensityRule
from klip_med.priors.train import TrainSettings, train_prior
from klip_med.sampling import DDSSampler, EpsilonPrior
from klip_med.score import FULL, KLIPAccumulator

SHIPPED = ("mri-brain-flair-128", "ct-abdomen-128")


def tiny_config(size: int = 16) -> PriorConfig:
    return PriorConfig(
        name="tiny", modality="MR", image_size=size, architecture=default_architecture((16, 16, 16, 16)),
        schedule=default_schedule(100), intensity=IntensityRule("mr-percentile", percentile=99.0, reference=0.8),
        weights_dtype="float32",
    )


# ---------------------------------------------------------------- shipped priors


def test_shipped_priors_are_registered_with_cards():
    names = priors.available()
    for name in SHIPPED:
        assert name in names
        config = priors.describe(name)
        assert config.image_size == 128
        assert config.training["steps_trained"] > 0 and config.training["manifest_sha256"]
        assert "heldout" not in config.training.get("split", "")  # trained on the train split only
        card = priors.model_card(name)
        assert "PSNR" in card and "held-out" in card
        assert (names[name] / "samples.png").is_file()


@pytest.mark.parametrize("name, spec", [("mri-brain-flair-128", "mri:accel=4,center=0.08,noise=0.01"),
                                        ("ct-abdomen-128", "ct-sparse:views=24,noise=0.5")])
def test_shipped_prior_samples_a_slice_with_klip(name, spec):
    """One tiny run per shipped prior: loads offline, samples 3 DDS steps, fills a KLIP map."""
    prior = priors.load(name)
    assert isinstance(prior, EpsilonPrior)
    rule = prior.config.intensity
    phantom = ct_phantom(128) if prior.config.modality == "CT" else mr_phantom(128)
    image = phantom.image * (255 if rule.kind == "mr-percentile" else 1)
    x = torch.from_numpy(rule.to_model(image))[None, None]
    gen = torch.Generator().manual_seed(0)
    physics = parse_physics(spec, 128, generator=gen)
    acc = KLIPAccumulator(windows=[FULL])
    result = DDSSampler(prior, n_steps=3).sample(physics(x), physics, 1, (1, 128, 128), gen, observers=[acc])
    maps = acc.result()
    assert torch.isfinite(result.samples).all()
    assert maps.pixel_nats.shape == (1, 1, 128, 128) and float(maps.pixel_nats.sum()) > 0


def test_unknown_prior_name_lists_shipped_ones():
    with pytest.raises(KLIPMedError, match="mri-brain-flair-128.*klip-med train"):
        priors.load("no-such-prior")


# ---------------------------------------------------------------- config and weights validation


def test_save_load_roundtrip_gives_same_network(tmp_path):
    torch.manual_seed(0)
    prior = DiffusionPrior(tiny_config())
    save_prior_dir(prior, prior.config, tmp_path / "p")
    loaded = load_prior_dir(tmp_path / "p")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 71.5])
    assert torch.equal(prior.eps(x, t), loaded.eps(x, t))
    assert priors.load(str(tmp_path / "p" / "weights.safetensors")).config.name == "tiny"
    # MONAI's linear-beta schedule is the DDPM one: alpha_bar_T = prod(1 - beta_t), beta 1e-4 .. 0.02
    expected = np.prod(1 - np.linspace(1e-4, 0.02, 100))
    assert abs(float(loaded.alphas_cumprod[-1]) - expected) < 1e-6  # MONAI works in float32


def test_float16_weights_are_upcast(tmp_path):
    config = tiny_config()
    config.weights_dtype = "float16"
    save_prior_dir(DiffusionPrior(config), config, tmp_path / "p")
    loaded = load_prior_dir(tmp_path / "p")
    assert next(loaded.parameters()).dtype == torch.float32


@pytest.fixture
def saved(tmp_path) -> Path:
    folder = tmp_path / "p"
    save_prior_dir(DiffusionPrior(tiny_config()), tiny_config(), folder)
    return folder


def test_missing_config_is_refused(saved):
    (saved / "config.json").unlink()
    with pytest.raises(KLIPMedError, match="config: expected a JSON file next to the weights"):
        load_prior_dir(saved)


def test_pickle_is_refused(saved):
    torch.save(DiffusionPrior(tiny_config()).unet.state_dict(), saved / "weights.safetensors")
    with pytest.raises(KLIPMedError, match="expected a safetensors file.*pickled"):
        load_prior_dir(saved)


def test_wrong_shapes_are_refused(saved, tmp_path):
    other = tiny_config()
    other.architecture = default_architecture((32, 32, 32, 32))  # same tensor names, wider
    save_prior_dir(DiffusionPrior(other), other, tmp_path / "q")
    shutil.copy(tmp_path / "q" / "weights.safetensors", saved / "weights.safetensors")
    with pytest.raises(KLIPMedError, match=r"expected shape \(16,.*found \(32,"):
        load_prior_dir(saved)


def test_missing_tensors_are_refused(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "weights.safetensors")
    tensors.pop(next(iter(tensors)))
    save_file(tensors, saved / "weights.safetensors")
    with pytest.raises(KLIPMedError, match="1 missing"):
        load_prior_dir(saved)


def test_dtype_mismatch_is_refused(saved):
    data = json.loads((saved / "config.json").read_text())
    data["weights_dtype"] = "float16"
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.raises(KLIPMedError, match="expected dtype float16"):
        load_prior_dir(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(extra=1), r"unknown \['extra'\]"),
        (lambda d: d["architecture"].update(magic=True), r"unknown \['magic'\]"),
        (lambda d: d.update(format_version=9), "version 1"),
        (lambda d: d["schedule"].update(kind="edm"), "schedule.kind"),
        (lambda d: d["intensity"].update(kind="z-score"), "intensity.kind: expected one of"),
        (lambda d: d.update(image_size="128"), "image_size"),
    ],
)
def test_bad_configs_are_refused(saved, edit, message):
    data = json.loads((saved / "config.json").read_text())
    edit(data)
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.raises(KLIPMedError, match=message):
        load_prior_dir(saved)


def test_wrong_image_shape_is_named():
    prior = DiffusionPrior(tiny_config())
    with pytest.raises(KLIPMedError, match=r"x_t: expected shape \(B, 1, 16, 16\)"):
        prior.eps(torch.zeros(1, 1, 32, 32), torch.zeros(1))


# ---------------------------------------------------------------- intensity rules


def test_ct_window_maps_and_clips():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1500.0], dtype=np.float32)
    model = ABDOMEN_WINDOW.to_model(hu)
    assert np.allclose(model, [-1, -1, 0, 1, 1])
    assert np.allclose(ABDOMEN_WINDOW.to_physical(model), [-160, -160, 40, 240, 240])


def test_mr_percentile_rule_is_scale_free():
    rule = IntensityRule("mr-percentile", percentile=99.0, reference=0.8)
    volume = np.random.default_rng(0).uniform(0, 1, (4, 8, 8)).astype(np.float32)
    assert np.allclose(rule.to_model(volume), rule.to_model(volume * 37.0), atol=1e-5)
    scale = rule.mr_scale(volume * 37.0)
    assert np.allclose(rule.to_physical(rule.to_model(volume * 37.0, scale), scale)[volume < 0.7],
                       (volume * 37.0)[volume < 0.7], rtol=1e-4)
    with pytest.raises(KLIPMedError, match="finite"):
        rule.to_model(np.array([np.nan]))


# ---------------------------------------------------------------- training


@pytest.fixture
def toy_manifest(tmp_path) -> tuple[Path, Path]:
    """Eight 16x16 MR phantom slices in two 'patients' (train) plus one held-out file."""
    root = tmp_path / "data"
    root.mkdir()
    items = []
    rng = np.random.default_rng(3)
    for k, split in enumerate(["train", "train", "dev"]):
        vol = np.stack([mr_phantom(16, rng).image for _ in range(4)]) * 255
        np.savez(root / f"p{k}.npz", img=vol.astype(np.uint8))
        items.append({"file": f"p{k}.npz", "sha256": file_sha256(root / f"p{k}.npz"), "split": split,
                      "slices": "all"})
    manifest = {"schema": "klip-med-manifest", "version": 1, "name": "toy-mr", "modality": "MR",
                "array_key": "img", "licence": "synthetic", "items": items}
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(manifest))
    return path, root


def toy_settings(**kw) -> TrainSettings:
    base = dict(name="toy", steps=6, batch_size=4, channels=(16, 16, 16, 16), num_train_timesteps=100,
                warmup_steps=2, checkpoint_every=3, log_every=1, flip_lr=True, rotate_deg=5.0,
                gain_jitter=0.05, weights_dtype="float32", seed=7)
    base.update(kw)
    return TrainSettings(**base)


def test_resume_continues_the_same_loss_curve(toy_manifest, tmp_path):
    manifest, root = toy_manifest
    straight = train_prior(manifest, tmp_path / "a", toy_settings(), root, progress=False)
    first = train_prior(manifest, tmp_path / "b", toy_settings(), root, stop_after=3, progress=False)
    assert first["steps"] == 3
    resumed = train_prior(manifest, tmp_path / "b", toy_settings(), root, progress=False)
    assert straight["steps"] == resumed["steps"] == 6
    curve_a = (tmp_path / "a" / "loss.csv").read_text()
    curve_b = (tmp_path / "b" / "loss.csv").read_text()
    assert curve_a == curve_b and len(curve_a.splitlines()) == 7
    a, b = load_prior_dir(tmp_path / "a"), load_prior_dir(tmp_path / "b")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert len(list((tmp_path / "b").glob("ckpt-*.safetensors"))) == 1  # old checkpoints pruned


def test_resume_refuses_changed_settings(toy_manifest, tmp_path):
    manifest, root = toy_manifest
    train_prior(manifest, tmp_path / "a", toy_settings(), root, stop_after=3, progress=False)
    with pytest.raises(KLIPMedError, match=r"same settings to resume.*\['lr'\]"):
        train_prior(manifest, tmp_path / "a", toy_settings(lr=1e-3), root, progress=False)


def test_exported_prior_records_provenance(toy_manifest, tmp_path):
    manifest, root = toy_manifest
    train_prior(manifest, tmp_path / "a", toy_settings(steps=2), root, progress=False)
    config = PriorConfig.read(tmp_path / "a" / "config.json")
    t = config.training
    assert t["manifest"] == "toy-mr" and t["manifest_sha256"] == file_sha256(manifest)
    assert t["n_slices"] == 8 and [f for f, _ in t["files"]] == ["p0.npz", "p1.npz"]  # dev file not used
    assert t["steps_trained"] == 2 and t["licence"] == "synthetic"
    assert config.intensity.kind == "mr-percentile" and 0 < config.intensity.reference <= 1


def test_cli_train_then_load(toy_manifest, tmp_path, capsys):
    manifest, root = toy_manifest
    out = tmp_path / "cli"
    code = cli_main(["train", "--manifest", str(manifest), "--data-root", str(root), "--out", str(out),
                     "--steps", "2", "--batch-size", "2", "--channels", "16,16,16,16", "--no-progress",
                     "--weights-dtype", "float32", "--warmup", "1"])
    assert code == 0 and json.loads(capsys.readouterr().out)["steps"] == 2
    assert priors.load(out).image_shape == (1, 16, 16)


def test_cli_train_bad_manifest_is_a_clean_error(tmp_path, capsys):
    code = cli_main(["train", "--manifest", str(tmp_path / "none.json"), "--out", str(tmp_path / "o"),
                     "--data-root", str(tmp_path)])
    assert code == 2 and "manifest: expected an existing JSON file" in capsys.readouterr().err
