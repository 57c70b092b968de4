"""Data manifests: the reader accepts a valid manifest and refuses every broken one clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from klip_med.data.manifest import DATA_ROOT_ENV, file_sha256, read_manifest
from klip_med.errors import KLIPMedError

REPO = Path(__file__).resolve().parents[1]


def write_npz(root: Path, rel: str, n: int = 5, size: int = 16) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(path, img=rng.integers(0, 255, (n, size, size)).astype(np.uint8),
             mask=np.zeros((n, size, size), bool))
    return file_sha256(path)


def manifest_dict(root: Path) -> dict:
    sha_a = write_npz(root, "a/p1.npz")
    sha_b = write_npz(root, "a/p2.npz")
    return {
        "schema": "klip-med-manifest", "version": 1, "name": "toy", "modality": "MR",
        "array_key": "img", "mask_key": "mask",
        "items": [
            {"file": "a/p1.npz", "sha256": sha_a, "split": "train", "slices": [0, 2, 4]},
            {"file": "a/p2.npz", "sha256": sha_b, "split": "dev", "slices": "all",
             "labels": {"patient": "p2"}},
            {"file": "a/p2.npz", "sha256": sha_b, "split": "test", "slices": {"start": 1, "stop": 3}},
        ],
    }


def write_manifest(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    return path


def test_valid_manifest_reads_splits_and_slices(tmp_path):
    root = tmp_path / "data"
    m = read_manifest(write_manifest(tmp_path, manifest_dict(root)), root)
    assert m.modality == "MR" and len(m.items) == 3
    train, _, keys = m.load_slices("train")
    assert train.shape == (3, 16, 16) and [k[1] for k in keys] == [0, 2, 4]
    dev, masks, _ = m.load_slices("dev", with_masks=True)
    assert dev.shape == (5, 16, 16) and masks.dtype == bool
    test, _, keys = m.load_slices("test")
    assert [k[1] for k in keys] == [1, 2]
    assert m.split("dev")[0].labels == {"patient": "p2"}


def test_data_root_from_environment(tmp_path, monkeypatch):
    root = tmp_path / "data"
    path = write_manifest(tmp_path, manifest_dict(root))
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    assert read_manifest(path).root == root.resolve()
    monkeypatch.delenv(DATA_ROOT_ENV)
    with pytest.raises(KLIPMedError, match="KLIP_MED_DATA_ROOT"):
        read_manifest(path)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d, r: d["items"][0].update(file="a/missing.npz"), "expected an existing file"),
        (lambda d, r: d["items"][0].update(sha256="0" * 64), "expected sha256 0000"),
        (lambda d, r: d["items"][0].update(file="../outside.npz"), "inside the data root"),
        (lambda d, r: d["items"][0].update(file="/etc/passwd"), "inside the data root"),
        (lambda d, r: d.update(colour="blue"), r"unknown \['colour'\]"),
        (lambda d, r: d["items"][0].update(weight=2), r"unknown \['weight'\]"),
        (lambda d, r: d["items"][0].update(split="validation"), "split: expected one of"),
        (lambda d, r: d["items"][0].update(slices="some"), "slices: expected"),
        (lambda d, r: d.update(version=2), "version 1"),
        (lambda d, r: d.pop("items"), r"missing \['items'\]"),
        (lambda d, r: d.update(modality="PET"), "modality: expected one of"),
    ],
)
def test_broken_manifests_raise_clear_errors(tmp_path, breakage, message):
    root = tmp_path / "data"
    data = manifest_dict(root)
    (tmp_path / "outside.npz").write_bytes(b"x")
    breakage(data, root)
    with pytest.raises(KLIPMedError, match=message):
        read_manifest(write_manifest(tmp_path, data), root)


def test_symlink_escaping_the_root_is_refused(tmp_path):
    root = tmp_path / "data"
    data = manifest_dict(root)
    outside = tmp_path / "secret.npz"
    outside.write_bytes(b"x")
    (root / "a" / "link.npz").symlink_to(outside)
    data["items"][0].update(file="a/link.npz", sha256=file_sha256(outside))
    with pytest.raises(KLIPMedError, match="inside the data root"):
        read_manifest(write_manifest(tmp_path, data), root)


def test_slice_out_of_range_named_on_load(tmp_path):
    root = tmp_path / "data"
    data = manifest_dict(root)
    data["items"][0]["slices"] = [0, 9]
    m = read_manifest(write_manifest(tmp_path, data), root)
    with pytest.raises(KLIPMedError, match=r"a/p1.npz: slices: expected indices in \[0, 5\)"):
        m.load_slices("train")


def test_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{not json")
    with pytest.raises(KLIPMedError, match="expected valid JSON"):
        read_manifest(path, tmp_path)


@pytest.mark.parametrize("name", ["lgg_flair_128.json", "ct_L067.json"])
def test_shipped_manifests_are_well_formed(name):
    """The committed manifests parse (schema, splits) without needing the data itself."""
    data = json.loads((REPO / "data_manifests" / name).read_text())
    assert data["schema"] == "klip-med-manifest" and data["version"] == 1
    splits = {item["split"] for item in data["items"]}
    assert splits == {"train", "dev", "test"}
    if name.startswith("lgg"):
        patients = {s: {i["labels"]["patient"] for i in data["items"] if i["split"] == s} for s in splits}
        assert len(patients["dev"]) + len(patients["test"]) >= 25
        assert not (patients["train"] & (patients["dev"] | patients["test"]))
        for item in data["items"]:
            if item["split"] == "train":  # only tumour-free slices are trained on
                assert not set(item["slices"]) & set(item["labels"]["lesion_slices"])
    else:
        train = set(data["items"][0]["slices"])
        for item in data["items"][1:]:
            lo, hi = item["slices"]["start"], item["slices"]["stop"]
            assert not train & set(range(lo - 10, hi + 10)), "held-out block too close to training"
