"""MONAI bundles of the shipped priors: export, verify against MONAI's metadata schema offline, run
with MONAI's own bundle runner on the bundled NIfTI, and get what KLIPReconstructd gives when called
directly."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import run, verify_metadata
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from klip_med.cli import main
from klip_med.monai import KLIPReconstructd
from klip_med.priors.bundle import SCHEMA_MD5, SCHEMA_NAME
from klip_med.priors.registry import resolve_prior_path

PRIOR = "mri-brain-flair-128"
TINY = {"samples": 1, "steps": 2, "null": "none"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "mri"
    assert main(["export-bundle", "--prior", PRIOR, "--out", str(out)]) == 0
    return out


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_writes_a_bundle_with_the_shipped_weights(bundle):
    for name in ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", f"configs/{SCHEMA_NAME}",
                 "models/config.json", "models/weights.safetensors", "docs/README.md", "sample_data/flair_demo.nii.gz"):
        assert (bundle / name).is_file(), name
    shipped = resolve_prior_path(PRIOR)
    assert sha256(bundle / "models/weights.safetensors") == sha256(shipped / "weights.safetensors")
    assert hashlib.md5((bundle / f"configs/{SCHEMA_NAME}").read_bytes()).hexdigest() == SCHEMA_MD5
    assert sorted(p.name for p in (bundle / "models/nulls").iterdir()) == sorted(
        p.name for p in (shipped / "nulls").iterdir())
    config = json.loads((bundle / "configs/inference.json").read_text())
    chain = [t if isinstance(t, str) else t["_target_"] for t in config["inference"]["transforms"]]
    assert chain[:4] == ["LoadImaged", "EnsureChannelFirstd", "Orientationd", "@reconstruct"]
    assert config["reconstruct"]["_target_"] == "klip_med.monai.KLIPReconstructd"
    assert all(config[name.lstrip("@")]["_target_"] == "SaveImaged" for name in chain[4:])
    readme = (bundle / "docs/README.md").read_text()
    assert "CC BY-NC-SA 4.0" in readme and "# Model card: `mri-brain-flair-128`" in readme
    assert "Apache-2.0" in readme and "TCGA_HT_7616" in readme  # the sample's source and licence


def test_metadata_verifies_offline_against_monais_schema(bundle, tmp_path, offline):
    schema = bundle / "configs" / SCHEMA_NAME
    verify_metadata(meta_file=str(bundle / "configs/metadata.json"), filepath=str(schema), hash_val=SCHEMA_MD5)
    metadata = json.loads((bundle / "configs/metadata.json").read_text())
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps({k: v for k, v in metadata.items() if k != "task"}))
    with pytest.raises(ValueError, match="'task' is a required property"):
        verify_metadata(meta_file=str(broken), filepath=str(schema), hash_val=SCHEMA_MD5)
    del metadata["network_data_format"]["inputs"]["x"]["value_range"]
    broken.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(broken), filepath=str(schema), hash_val=SCHEMA_MD5)
    changed = tmp_path / SCHEMA_NAME
    changed.write_text(schema.read_text().replace('"task"', '"tusk"'))
    with pytest.raises(Exception, match="md5 hash check of existing file failed"):  # MONAI's HashCheckError
        verify_metadata(meta_file=str(bundle / "configs/metadata.json"), filepath=str(changed), hash_val=SCHEMA_MD5)


def direct(bundle: Path, image: Path) -> dict:
    """The bundle's pipeline written by hand, KLIPReconstructd called directly with the same settings."""
    config = json.loads((bundle / "configs/inference.json").read_text())
    return Compose([
        LoadImaged(keys="image", reader="NibabelReader"), EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=None),
        KLIPReconstructd(keys="image", prior=str(bundle / "models"), physics=config["physics"], sampler=config["sampler"],
                         seed=config["seed"], device="cpu", **TINY),
    ])({"image": str(image)})


def test_monai_bundle_run_equals_klipreconstructd_called_directly(bundle, tmp_path, offline):
    out = tmp_path / "eval"
    run(config_file=str(bundle / "configs/inference.json"), bundle_root=str(bundle), output_dir=str(out), **TINY)
    written = sorted(p.name for p in out.iterdir())
    assert written == ["flair_demo_klip.nii.gz", "flair_demo_recon.nii.gz", "flair_demo_std.nii.gz"]
    data = direct(bundle, bundle / "sample_data/flair_demo.nii.gz")
    for name in ("recon", "klip", "std"):
        saved = nib.load(out / f"flair_demo_{name}.nii.gz")
        expected = data[f"image_{name}"]
        np.testing.assert_array_equal(np.squeeze(saved.get_fdata(dtype=np.float32)), np.squeeze(expected.numpy()))
        np.testing.assert_allclose(saved.affine, expected.affine.numpy(), atol=1e-5)
    assert float(np.abs(data["image_klip"].numpy()).max()) > 0


def test_export_refuses_to_overwrite_what_is_not_a_bundle(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["export-bundle", "--prior", PRIOR, "--out", str(tmp_path / "taken")]) == 2
    assert "expected a new folder (or overwrite=True / --overwrite), found an existing path" in capsys.readouterr().err
    assert main(["export-bundle", "--prior", PRIOR, "--out", str(tmp_path / "taken"), "--overwrite"]) == 2
    assert "expected an existing bundle folder to overwrite" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert main(["export-bundle", "--prior", "no-such-prior", "--out", str(tmp_path / "b")]) == 2
    assert "prior: expected a shipped prior name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no half-written bundle left behind


@pytest.mark.slow
def test_every_shipped_prior_runs_through_monais_command_line(tmp_path):
    pytest.importorskip("fire")  # `python -m monai.bundle` needs it
    assert main(["export-bundle", "--out", str(tmp_path)]) == 0
    for name, stem in (("mri-brain-flair-128", "flair_demo"), ("ct-abdomen-128", "ct_abdomen_demo")):
        b = tmp_path / name
        subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
                        str(b / "configs/metadata.json"), "--filepath", str(b / "configs" / SCHEMA_NAME),
                        "--hash_val", SCHEMA_MD5], check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(b / "configs/inference.json"),
                        "--bundle_root", str(b), "--samples", "1", "--steps", "2", "--null", "none"],
                       check=True, capture_output=True, cwd=tmp_path)
        data = direct(b, b / "sample_data" / f"{stem}.nii.gz")
        saved = nib.load(b / "eval" / f"{stem}_klip.nii.gz").get_fdata(dtype=np.float32)
        np.testing.assert_array_equal(np.squeeze(saved), np.squeeze(data["image_klip"].numpy()))
        shutil.rmtree(b / "eval")


@pytest.mark.slow
def test_run_bundle_example(tmp_path):
    import os

    path = Path(__file__).resolve().parents[1] / "examples" / "run_bundle.py"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(path), "--out", str(tmp_path / "out"), "--steps", "2"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified" in proc.stdout and "flair_demo_klip.nii.gz" in proc.stdout and "done in" in proc.stdout
