"""``klip-med manifest``: synthetic DICOM CT series (4 patients, 6 series, 3 slices of 64 x 64 HU with
a non-trivial rescale) -> npz files + a manifest that reads back, splits by patient, keeps HU and
spacing, refuses bad input clearly, and feeds the benchmark selection and calibration."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from klip_med.cli import main
from klip_med.cli.manifest import DEFAULT_LICENCE as CLI_LICENCE
from klip_med.data.build import DEFAULT_LICENCE, assign_splits, split_counts
from klip_med.data.manifest import file_sha256, read_manifest
from klip_med.data.phantom import ct_phantom
from klip_med.data.selection import select_slices
from klip_med.errors import KLIPMedError
from klip_med.io import Volume, write_nifti
from klip_med.pipeline.build_manifest import build_manifest, find_series

SRC = 64  # source matrix; the working grid in these tests is 32 (an exact 2 x 2 area average)
SPACING = 3.0  # source pixel spacing, mm
DZ = 2.5  # slice spacing, mm
SLOPE, INTERCEPT = 2.0, -3000.0  # stored = (HU - INTERCEPT) / SLOPE: the reader must apply the rescale
SERIES = {"P1": 2, "P2": 1, "P3": 2, "P4": 1}  # series per patient


def planted_hu(seed: int, n: int = 3) -> np.ndarray:
    """(n, 64, 64) integer, even HU of an abdomen phantom on a 192 mm field of view."""
    rng = np.random.default_rng(seed)
    hu = np.stack([ct_phantom(SRC, rng, fov_mm=SRC * SPACING).image for _ in range(n)])
    return (2 * np.round(np.clip(hu, -1000, 2000) / 2)).astype(np.float32)


def write_series(folder: Path, hu: np.ndarray, patient: str, number: int, modality: str = "CT",
                 image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")) -> list[Path]:
    """One DICOM series from CT_small.dcm: slices ``hu[k]`` at z = 10 + k * DZ mm, files in reverse slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(hu.shape[0]):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.PatientID, ds.SeriesNumber, ds.Modality = patient, number, modality
        ds.SeriesDescription, ds.ImageType = f"{patient} series {number}", list(image_type)
        ds.Rows = ds.Columns = SRC
        ds.PixelSpacing = [SPACING, SPACING]
        ds.ImagePositionPatient = [-96.0, -96.0, 10.0 + k * DZ]
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.PixelData = ((hu[k] - INTERCEPT) / SLOPE).astype(np.int16).tobytes()
        path = folder / f"img{hu.shape[0] - 1 - k:03d}.dcm"  # file names in reverse slice order
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory) -> tuple[Path, dict[tuple[str, int], np.ndarray]]:
    """``root/site/<patient>/study/s<n>/*.dcm`` and the planted HU of each (patient, series number)."""
    root = tmp_path_factory.mktemp("dicom")
    planted = {}
    for p, (patient, n_series) in enumerate(SERIES.items()):
        for number in range(1, n_series + 1):
            hu = planted_hu(10 * p + number)
            write_series(root / "site" / patient / "study" / f"s{number}", hu, patient, number)
            planted[(patient, number)] = hu
    (root / "site" / "README.txt").write_text("not DICOM\n")
    return root, planted


def _digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _build(tree: Path, tmp: Path, **kwargs):
    return build_manifest([tree / "site"], tmp / "R", "my-ct", tmp / "my_ct.json", size=kwargs.pop("size", 32),
                          **kwargs)


def test_manifest_reads_back_checksums_match_and_patients_stay_in_one_split(dicom_tree, tmp_path):
    tree, _ = dicom_tree
    before = _digests(tree)
    result = _build(tree, tmp_path)
    assert _digests(tree) == before  # inputs never modified
    manifest = read_manifest(tmp_path / "my_ct.json", tmp_path / "R")
    raw = json.loads((tmp_path / "my_ct.json").read_text())
    assert raw["created_by"] == "klip-med manifest" and raw["array_key"] == "hu"
    assert raw["spacing_key"] == "pixel_spacing_mm" and raw["licence"] == DEFAULT_LICENCE == CLI_LICENCE
    assert "0.7/0.15/0.15, seed 0" in raw["description"] and "skipped 1 file" in raw["notes"][0]
    assert manifest.modality == "CT" and len(manifest.items) == sum(SERIES.values())
    splits: dict[str, set[str]] = {}
    for item in manifest.items:
        assert file_sha256(item.path) == item.sha256 and item.slices == "all"
        assert item.relative.startswith("my-ct/") and set(item.labels) == {
            "patient", "series_uid", "series_description", "source"}
        splits.setdefault(item.labels["patient"], set()).add(item.split)
    assert set(splits) == set(SERIES) and all(len(s) == 1 for s in splits.values())
    assert {next(iter(s)) for s in splits.values()} == {"train", "dev", "test"}  # 4 patients: 2 / 1 / 1
    assert result.counts["train"]["patients"] == 2 and sum(c["series"] for c in result.counts.values()) == 6
    assert {p.name for p in (tmp_path / "R" / "my-ct").iterdir()} == {
        "P1_1.npz", "P1_2.npz", "P2_1.npz", "P3_1.npz", "P3_2.npz", "P4_1.npz"}


def test_same_inputs_give_the_same_bytes_and_the_seed_moves_patients(dicom_tree, tmp_path):
    tree, _ = dicom_tree
    _build(tree, tmp_path / "a")
    _build(tree, tmp_path / "b")
    a, b = (tmp_path / "a" / "my_ct.json").read_text(), (tmp_path / "b" / "my_ct.json").read_text()
    assert a.replace(str(tmp_path / "a"), "") == b.replace(str(tmp_path / "b"), "")  # only the paths differ
    assert sorted(_digests(tmp_path / "a" / "R").values()) == sorted(_digests(tmp_path / "b" / "R").values())
    patients = list(SERIES)
    base = assign_splits(patients, (0.7, 0.15, 0.15), 0)
    assert assign_splits(patients[::-1], (0.7, 0.15, 0.15), 0) == base  # order of discovery does not matter
    other = next(s for s in range(1, 50) if assign_splits(patients, (0.7, 0.15, 0.15), s) != base)
    result = _build(tree, tmp_path / "c", seed=other)
    moved = {i.labels["patient"]: i.split for i in result.manifest.items}
    assert moved == assign_splits(patients, (0.7, 0.15, 0.15), other) != base


def test_values_are_hu_after_rescale_and_spacing_follows_the_working_grid(dicom_tree, tmp_path):
    tree, planted = dicom_tree
    manifest = _build(tree, tmp_path).manifest
    for item in manifest.items:
        number = int(item.relative.rsplit("_", 1)[1].split(".")[0])
        hu = planted[(item.labels["patient"], number)]
        with np.load(item.path) as data:
            assert data["hu"].dtype == np.float32 and data["hu"].shape == (3, 32, 32)
            expected = hu.reshape(3, 32, 2, 32, 2).mean(axis=(2, 4))  # 2 x 2 area average
            np.testing.assert_allclose(data["hu"], expected, atol=1e-3)
            np.testing.assert_allclose(data["pixel_spacing_mm"], [2 * SPACING, 2 * SPACING])
            np.testing.assert_allclose(data["z_mm"], 10.0 + DZ * np.arange(3), atol=1e-6)
    assert float(expected.min()) == -1000.0 and float(expected.max()) > 500  # air and bone, in HU


def test_bad_inputs_are_refused_naming_the_argument(dicom_tree, tmp_path):
    tree, _ = dicom_tree
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(KLIPMedError, match=r"nothing_here: expected a DICOM image series .* found none among 1"):
        build_manifest([empty], tmp_path / "R", "x", tmp_path / "x.json")
    with pytest.raises(KLIPMedError, match="no such path"):
        build_manifest([tmp_path / "missing"], tmp_path / "R", "x", tmp_path / "x.json")
    (tmp_path / "exists.json").write_text("{}")
    with pytest.raises(KLIPMedError, match=r"--out: expected a new manifest file \(or --overwrite\)"):
        build_manifest([tree / "site"], tmp_path / "R", "x", tmp_path / "exists.json")
    with pytest.raises(KLIPMedError, match=r"\.dcm: expected MR images \(--modality MR\), found Modality CT"):
        build_manifest([tree / "site"], tmp_path / "R", "x", tmp_path / "x.json", modality="MR")
    with pytest.raises(KLIPMedError, match="--name: expected a folder-safe name"):
        build_manifest([tree / "site"], tmp_path / "R", "../up", tmp_path / "x.json")
    mr = tmp_path / "mixed"
    write_series(mr / "ct", planted_hu(1), "Q1", 1)
    write_series(mr / "mr", planted_hu(2), "Q2", 1, modality="MR")
    with pytest.raises(KLIPMedError, match=r"inputs: expected series of one modality .* mixed modalities: CT"):
        build_manifest([mr], tmp_path / "R", "x", tmp_path / "x.json")
    seg = tmp_path / "seg"
    write_series(seg, planted_hu(1), "Q1", 1, modality="OT")
    with pytest.raises(KLIPMedError, match=r"img000\.dcm: attribute Modality: expected CT or MR images, found 'OT'"):
        build_manifest([seg], tmp_path / "R", "x", tmp_path / "x.json")
    anon = tmp_path / "anon"
    write_series(anon, planted_hu(1), "", 1)
    with pytest.raises(KLIPMedError, match="attribute PatientID: .*--patient-from input"):
        build_manifest([anon], tmp_path / "R", "x", tmp_path / "x.json")
    with pytest.raises(KLIPMedError, match=r"at least 3 patients .* use --split-fractions 1,0,0 .* found 1 patient"):
        build_manifest([anon], tmp_path / "R", "x", tmp_path / "x.json", patient_from="input")
    result = build_manifest([anon], tmp_path / "R", "x", tmp_path / "x.json", patient_from="input",
                            fractions=(1, 0, 0), size=16)
    assert [(i.labels["patient"], i.split) for i in result.manifest.items] == [("anon", "train")]
    with pytest.raises(KLIPMedError, match="--split-fractions: expected three non-negative"):
        build_manifest([anon], tmp_path / "R", "y", tmp_path / "y.json", fractions="0.5,0.5")
    assert not (tmp_path / "y.json").exists() and not (tmp_path / "R" / "y").exists()


def test_split_counts_give_every_split_a_patient():
    assert split_counts(4, (0.7, 0.15, 0.15)) == (2, 1, 1)
    assert split_counts(3, (0.7, 0.15, 0.15)) == (1, 1, 1)
    assert split_counts(10, (0.7, 0.15, 0.15)) == (7, 2, 1)
    assert split_counts(1, (1.0, 0.0, 0.0)) == (1, 0, 0)
    assert split_counts(2, (0.0, 0.5, 0.5)) == (0, 1, 1)
    with pytest.raises(KLIPMedError, match="found 2 patient"):
        split_counts(2, (0.7, 0.15, 0.15))


def test_localizers_are_skipped_and_nifti_needs_a_modality(tmp_path):
    write_series(tmp_path / "in" / "axial", planted_hu(1), "Q1", 2)
    write_series(tmp_path / "in" / "scout", planted_hu(2, n=1), "Q1", 1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(tmp_path / "in" / "seg", planted_hu(3, n=1), "Q1", 3, modality="SEG")  # a derived object
    refs, notes = find_series([tmp_path / "in"])
    assert [r.series_number for r in refs] == ["2"]
    assert sorted(n.split("skipped ")[1].split(" series")[0] for n in notes) == ["derived (SEG)", "localizer"]
    affine = np.diag([-3.0, -3.0, 2.0, 1.0])
    for patient in ("A", "B", "C"):
        folder = tmp_path / "nii" / patient
        folder.mkdir(parents=True)
        write_nifti(Volume(planted_hu(3) / 1000 + 1, affine, None, "t"), folder / "flair.nii.gz")
    with pytest.raises(KLIPMedError, match="--modality: expected CT or MR for NIfTI input"):
        build_manifest([tmp_path / "nii"], tmp_path / "R", "mr", tmp_path / "mr.json")
    result = build_manifest([tmp_path / "nii"], tmp_path / "R", "mr", tmp_path / "mr.json", modality="MR",
                            patient_from="parent", size=32)
    assert result.manifest.array_key == "image"
    assert sorted(i.labels["patient"] for i in result.manifest.items) == ["A", "B", "C"]
    with np.load(result.manifest.items[0].path) as data:
        np.testing.assert_allclose(data["pixel_spacing_mm"], [6.0, 6.0])


@pytest.fixture(scope="module")
def tiny_ct_prior(tmp_path_factory) -> Path:
    """A 32 x 32 CT prior folder with random weights (seeded without touching the global generator)."""
    from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
    from klip_med.priors.diffusion import DiffusionPrior, save_prior_dir
    from klip_med.priors.intensity import ABDOMEN_WINDOW

    config = PriorConfig(name="tiny-ct", modality="CT", image_size=32, architecture=default_architecture((16, 16, 16, 16)),
                         schedule=default_schedule(100), intensity=ABDOMEN_WINDOW, weights_dtype="float32")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prior = DiffusionPrior(config)
    return save_prior_dir(prior, config, tmp_path_factory.mktemp("prior") / "tiny-ct")


def test_built_manifest_feeds_selection_and_calibration(dicom_tree, tiny_ct_prior, tmp_path):
    from klip_med.pipeline.calibrate import manifest_null_images
    from klip_med.priors import load

    tree, _ = dicom_tree
    result = build_manifest([tree / "site"], tmp_path / "R", "my-ct", tmp_path / "my_ct.json",
                            prior=str(tiny_ct_prior))  # the grid (32) from the prior's config
    prior = load(tiny_ct_prior)
    manifest = result.manifest
    chosen = select_slices(manifest, "dev", prior, max_slices_per_patient=2, lesions="inserted", seed=0)
    assert [s.label for s in chosen] == [0, 1] and chosen[1].lesion.any() and chosen[0].image.shape == (32, 32)
    assert chosen[1].info["inserted"]["design"] == "soft-tissue"
    images, source, groups, _ = manifest_null_images(manifest, "test", prior, max_slices=2)
    assert len(images) == 1 and groups == [next(i.labels["patient"] for i in manifest.split("test"))]
    with pytest.raises(KLIPMedError, match=r"--size: expected 32 \(the grid of --prior"):
        build_manifest([tree / "site"], tmp_path / "R", "x", tmp_path / "x.json", prior=str(tiny_ct_prior), size=64)


def test_cli_end_to_end(dicom_tree, tmp_path, capsys):
    tree, _ = dicom_tree
    out = tmp_path / "my_ct.json"
    args = ["manifest", str(tree / "site"), "--name", "my-ct", "--data-root", str(tmp_path / "R"), "--out", str(out),
            "--size", "32", "--split-fractions", "0.5,0.25,0.25", "--seed", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| split | patients | series | slices |" in printed and "| all | 4 | 6 | 18 |" in printed
    assert read_manifest(out, tmp_path / "R").name == "my-ct"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klip-med: error: --out: expected a new manifest file") and "\n" not in err
    assert main([*args, "--overwrite", "--quiet"]) == 0
