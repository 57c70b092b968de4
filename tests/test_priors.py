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


# ---------------------------------------------------------------- training packs, continuing, options


@pytest.fixture
def toy_ct_manifest(tmp_path) -> tuple[Path, Path]:
    """Six 16x16 CT phantom slices in HU (int16, air at -1000: outside the window) plus a dev file."""
    root = tmp_path / "ct-data"
    root.mkdir()
    rng = np.random.default_rng(5)
    items = []
    for k, split in enumerate(["train", "dev"]):
        hu = np.stack([ct_phantom(16, rng).image for _ in range(6)]).round().astype(np.int16)
        np.savez(root / f"c{k}.npz", hu=hu)
        items.append({"file": f"c{k}.npz", "sha256": file_sha256(root / f"c{k}.npz"), "split": split,
                      "slices": [0, 2, 3, 5] if split == "train" else "all"})
    manifest = {"schema": "klip-med-manifest", "version": 1, "name": "toy-ct", "modality": "CT",
                "array_key": "hu", "licence": "synthetic", "items": items}
    path = tmp_path / "toy-ct.json"
    path.write_text(json.dumps(manifest))
    return path, root


@pytest.mark.parametrize("which", ["toy_manifest", "toy_ct_manifest"])
def test_training_pack_gives_the_manifests_images_bit_for_bit(which, request, tmp_path):
    from klip_med.data.manifest import read_manifest
    from klip_med.priors.train_data import prepare_training_data, read_train_pack, write_train_pack

    manifest, root = request.getfixturevalue(which)
    read = read_manifest(manifest, root)
    header = write_train_pack(read, tmp_path / "pack.npz")
    direct = prepare_training_data(read, toy_settings())
    packed = read_train_pack(tmp_path / "pack.npz", toy_settings())
    assert torch.equal(direct.images, packed.images) and direct.images.abs().max() <= 1
    assert direct.intensity == packed.intensity and direct.modality == packed.modality == read.modality
    assert {k: v for k, v in packed.provenance.items() if k != "pack"} == direct.provenance
    assert packed.provenance["pack"]["sha256"] == file_sha256(tmp_path / "pack.npz")
    assert header["provenance"]["n_slices"] == direct.images.shape[0] == 8 if which == "toy_manifest" else 4
    with np.load(tmp_path / "pack.npz") as data:  # a plain npz (LZMA members) that numpy reads
        assert data["codes"].dtype == (np.uint8 if read.modality == "MR" else np.int16)
    # training from the pack is training from the manifest
    train_prior(manifest, tmp_path / "m", toy_settings(steps=2), root, progress=False)
    train_prior(None, tmp_path / "p", toy_settings(steps=2), pack=tmp_path / "pack.npz", progress=False)
    assert (tmp_path / "m" / "loss.csv").read_text() == (tmp_path / "p" / "loss.csv").read_text()


def test_a_pack_that_does_not_decode_to_its_images_is_refused(toy_manifest, tmp_path):
    import zipfile

    from klip_med.data.manifest import read_manifest
    from klip_med.priors.train_data import read_train_pack, write_train_pack

    manifest, root = toy_manifest
    write_train_pack(read_manifest(manifest, root), tmp_path / "pack.npz")
    with np.load(tmp_path / "pack.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["codes"][0, 8, 8] ^= 1  # one grey level of one pixel
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array)
    with pytest.raises(KLIPMedError, match="expected decoded images with sha256"):
        read_train_pack(tmp_path / "bad.npz", toy_settings())
    with pytest.raises(KLIPMedError, match="mr_percentile 99.0, found 99.5"):
        read_train_pack(tmp_path / "pack.npz", toy_settings(mr_percentile=99.0))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(KLIPMedError, match="expected a klip-med-train-pack file"):
        read_train_pack(tmp_path / "other.npz", toy_settings())
    with pytest.raises(KLIPMedError, match="--pack: expected a training pack file"):
        read_train_pack(tmp_path / "none.npz", toy_settings())
    with pytest.raises(KLIPMedError, match="exactly one of --manifest and --pack, found both"):
        train_prior(manifest, tmp_path / "x", toy_settings(), root, pack=tmp_path / "pack.npz", progress=False)


def test_continuing_a_prior_adds_up_steps_seconds_and_the_loss_curve(toy_manifest, tmp_path):
    manifest, root = toy_manifest
    train_prior(manifest, tmp_path / "a", toy_settings(steps=4), root, progress=False)
    # no step yet: the export is the prior continued, EMA and all
    train_prior(manifest, tmp_path / "b0", toy_settings(steps=4), root, stop_after=0,
                init_from=tmp_path / "a", progress=False)
    a, b0 = load_prior_dir(tmp_path / "a"), load_prior_dir(tmp_path / "b0")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b0.state_dict().values(), strict=True))
    summary = train_prior(manifest, tmp_path / "b", toy_settings(steps=3, seed=11), root,
                          init_from=tmp_path / "a", progress=False)
    assert summary["steps"] == 3 and summary["steps_trained"] == 7
    first, second = PriorConfig.read(tmp_path / "a" / "config.json"), PriorConfig.read(tmp_path / "b" / "config.json")
    t = second.training
    assert t["steps_trained"] == 7 and t["continued_from"]["steps_trained"] == 4
    assert t["train_seconds"] >= first.training["train_seconds"]
    assert [r["steps"] for r in t["runs"]] == [4, 3] and t["runs"][1]["seed"] == 11
    assert t["runs"][1]["mixed_precision"] == "float32" and t["runs"][1]["compile"] is None
    rows_a = (tmp_path / "a" / "loss.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert rows_b[: len(rows_a)] == rows_a and [r.split(",")[0] for r in rows_b[len(rows_a):]] == ["5", "6", "7"]


def test_continuing_needs_the_same_network_and_intensity_rule(toy_manifest, toy_ct_manifest, tmp_path):
    manifest, root = toy_manifest
    train_prior(manifest, tmp_path / "a", toy_settings(steps=1), root, progress=False)
    with pytest.raises(KLIPMedError, match=r"--init-from .*expected a prior with architecture .*\(--channels\)"):
        train_prior(manifest, tmp_path / "b", toy_settings(channels=(16, 16, 16, 32)), root,
                    init_from=tmp_path / "a", progress=False)
    ct, ct_root = toy_ct_manifest
    with pytest.raises(KLIPMedError, match="expected the intensity rule of the training data"):
        train_prior(ct, tmp_path / "c", toy_settings(), ct_root, init_from=tmp_path / "a", progress=False)


def test_a_run_compiled_then_resumed_eagerly_is_the_straight_run(toy_manifest, tmp_path):
    """torch.compile (a tracing backend: the same arithmetic) is a run option: the state dict, the
    EMA and the checkpoint are the eager run's, so a compiled run resumes eagerly, exactly."""
    from klip_med.priors.train_step import TrainOptions

    manifest, root = toy_manifest
    traced = TrainOptions(compile_mode="default", compile_backend="eager")
    train_prior(manifest, tmp_path / "a", toy_settings(), root, progress=False)
    train_prior(manifest, tmp_path / "b", toy_settings(), root, stop_after=3, options=traced, progress=False)
    train_prior(manifest, tmp_path / "b", toy_settings(), root, progress=False)
    assert (tmp_path / "a" / "loss.csv").read_text() == (tmp_path / "b" / "loss.csv").read_text()
    a, b = load_prior_dir(tmp_path / "a"), load_prior_dir(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    calls = PriorConfig.read(tmp_path / "b" / "config.json").training["runs"][0]["calls"]
    assert [(c["from_step"], c["to_step"], c["compile"]) for c in calls] == [(0, 3, "default (eager)"), (3, 6, None)]


def test_bf16_autocast_and_fused_adam_on_the_cpu(toy_manifest, tmp_path):
    from klip_med.priors.train_step import TrainOptions

    manifest, root = toy_manifest
    train_prior(manifest, tmp_path / "f", toy_settings(steps=3), root, progress=False)
    train_prior(manifest, tmp_path / "h", toy_settings(steps=3), root, progress=False,
                options=TrainOptions(precision="bf16", fused_adam=True))
    run = PriorConfig.read(tmp_path / "h" / "config.json").training["runs"][-1]
    assert run["mixed_precision"] == "bf16 autocast" and run["fused_adam"] is True
    f32 = [float(r.split(",")[1]) for r in (tmp_path / "f" / "loss.csv").read_text().splitlines()[1:]]
    bf16 = [float(r.split(",")[1]) for r in (tmp_path / "h" / "loss.csv").read_text().splitlines()[1:]]
    assert f32 != bf16 and np.allclose(f32, bf16, rtol=0.1)  # same batches, rounded network
    with pytest.raises(KLIPMedError, match=r"--precision: expected one of \['auto', 'bf16', 'float32'\]"):
        TrainOptions(precision="fp8")


def test_lr_schedule_of_a_continued_run():
    from klip_med.priors.train import lr_at

    s = toy_settings(steps=200000, warmup_steps=200, lr=2e-4, final_lr_fraction=1.0)
    assert lr_at(0, s) == pytest.approx(1e-6) and lr_at(99, s) == pytest.approx(1e-4)
    assert lr_at(199, s) == lr_at(200, s) == lr_at(150000, s) == pytest.approx(2e-4)
    decaying = toy_settings(steps=1200, warmup_steps=200, lr=2e-4, final_lr_fraction=0.1)
    assert lr_at(700, decaying) == pytest.approx(1.1e-4) and lr_at(1200, decaying) == pytest.approx(2e-5)


def test_a_killed_run_leaves_its_last_minute_published(toy_manifest, tmp_path):
    """--checkpoint-minutes 0 checkpoints and publishes after every step; kill -9 keeps the tar."""
    import os
    import subprocess
    import sys
    import tarfile
    import time

    manifest, root = toy_manifest
    tar = tmp_path / "prior.tar"
    cmd = [sys.executable, "-m", "klip_med", "train", "--manifest", str(manifest), "--data-root", str(root),
           "--out", str(tmp_path / "run"), "--steps", "100000", "--batch-size", "2", "--channels", "16,16,16,16",
           "--weights-dtype", "float32", "--warmup", "1", "--checkpoint-minutes", "0", "--publish", str(tar),
           "--no-progress", "--log-every", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not tar.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert tar.is_file(), err.decode()[-2000:]
    with tarfile.open(tar) as archive:
        assert sorted(archive.getnames()) == ["run/config.json", "run/loss.csv", "run/weights.safetensors"]
        archive.extractall(tmp_path / "back", filter="data")
    prior = priors.load(tmp_path / "back" / "run")
    steps = prior.config.training["steps_trained"]
    assert 1 <= steps < 100000
    assert (tmp_path / "back" / "run" / "loss.csv").read_text().splitlines()[-1].startswith(f"{steps},")


def test_cli_train_from_a_pack_continuing_a_prior(toy_manifest, tmp_path, capsys):
    from klip_med.data.manifest import read_manifest
    from klip_med.priors.train_data import write_train_pack

    manifest, root = toy_manifest
    write_train_pack(read_manifest(manifest, root), tmp_path / "pack.npz")
    train_prior(manifest, tmp_path / "a", toy_settings(steps=2), root, progress=False)
    code = cli_main(["train", "--pack", str(tmp_path / "pack.npz"), "--init-from", str(tmp_path / "a"),
                     "--out", str(tmp_path / "b"), "--steps", "2", "--batch-size", "2", "--warmup", "1",
                     "--weights-dtype", "float32", "--no-progress", "--precision", "bf16",
                     "--publish", str(tmp_path / "b.tar")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["steps_trained"] == 4 and summary["published"] == str(tmp_path / "b.tar")
    assert priors.load(tmp_path / "b").config.architecture["channels"] == [16, 16, 16, 16]  # from --init-from
    with pytest.raises(SystemExit):
        cli_main(["train", "--pack", "p.npz", "--manifest", "m.json", "--out", str(tmp_path / "c")])
    assert "not allowed with argument --pack" in capsys.readouterr().err


# ---------------------------------------------------------------- the plateau rule


def _curve(steps: int, every: int, loss) -> list[tuple[int, float]]:
    return [(s, float(loss(s))) for s in range(every, steps + 1, every)]


def test_plateau_rule_on_falling_flat_and_short_curves():
    from klip_med.priors.plateau import plateau

    rng = np.random.default_rng(0)
    falling = plateau(_curve(20000, 50, lambda s: 0.008 + 0.004 * np.exp(-s / 8000)))
    assert falling.plateaued is False and falling.drop > 0.02 and "still falling" in falling.reason
    flat = plateau(_curve(20000, 50, lambda s: 0.008 * (1 + 0.05 * rng.standard_normal())))
    assert flat.plateaued is True and abs(flat.drop) < 0.02 and "plateaued" in flat.reason
    rising = plateau(_curve(20000, 100, lambda s: 0.008 + 1e-8 * s))
    assert rising.plateaued is True and rising.drop < 0
    short = plateau(_curve(6000, 100, lambda s: 0.01))
    assert short.plateaued is None and short.drop is None and "too few steps" in short.reason
    # the windows: the last 30% of 20000 steps starts at 14000; [14000, 15000] against [19000, 20000]
    step = plateau(_curve(20000, 100, lambda s: 0.010 if s <= 15000 else 0.0099))
    assert step.first_mean == pytest.approx(0.010) and step.last_mean == pytest.approx(0.0099)
    assert step.drop == pytest.approx(0.01) and step.plateaued is True


def test_plateau_windows_weight_rows_by_the_steps_they_cover():
    from klip_med.priors.plateau import plateau

    # a first run logged every 100 steps, a continued one every 50: each row is the mean of its interval
    rows = _curve(14000, 100, lambda s: 0.02) + [(s, 0.01) for s in range(14050, 20001, 50)]
    verdict = plateau(rows)
    assert verdict.first_mean == pytest.approx(0.01) and verdict.last_mean == pytest.approx(0.01)
    coarse = [(14100, 0.03)]  # one row covering 14000..14100, then finer rows
    verdict = plateau(_curve(14000, 100, lambda s: 0.02) + coarse + [(s, 0.01) for s in range(14150, 20001, 50)])
    assert verdict.first_mean == pytest.approx((100 * 0.03 + 900 * 0.01) / 1000)


def test_plateau_rule_refuses_bad_curves(tmp_path):
    from klip_med.priors.plateau import plateau, read_loss_csv

    for rows, named in (([], "at least one"), ([(10, 0.1), (5, 0.1)], "strictly increasing"),
                        ([(10, float("nan"))], "finite losses"), ([(0, 0.1)], "steps >= 1")):
        with pytest.raises(KLIPMedError, match=named):
            plateau(rows)
    with pytest.raises(KLIPMedError, match="tail: expected a fraction"):
        plateau([(10, 0.1)], tail=0)
    (tmp_path / "loss.csv").write_text("step,loss\n10,0.1\n20,abc\n")
    with pytest.raises(KLIPMedError, match="line 3: expected 'step,loss'"):
        read_loss_csv(tmp_path / "loss.csv")
    shipped = read_loss_csv(Path(priors.available()["mri-brain-flair-128"]) / "loss.csv")
    assert plateau(shipped).steps == shipped[-1][0] > 6000
