"""`klip-med demo` and `klip-med run` end to end with tiny settings (CPU): every listed output is
written and reads back (nibabel, pydicom / highdicom, dciodvfy when installed); an interrupted `run`
resumes to the same outputs as an uninterrupted one; user mistakes exit 2 with one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from klip_med.cli import common as cli
from klip_med.cli import main
from klip_med.data.phantom import ct_phantom
from klip_med.io import Volume, read_dicom_series, read_parametric_map, read_seg, validate, write_nifti
from klip_med.io.inputs import read_input
from klip_med.pipeline import KLIPSettings
from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
from klip_med.priors.diffusion import DiffusionPrior, save_prior_dir
from klip_med.priors.intensity import ABDOMEN_WINDOW

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
TINY = ["--samples", "1", "--steps", "2", "--no-progress"]
SHIPPED_CT_UID = "1.3.12.2.1107.5.1.4.60064.30000022120808113428000016576"


def _dciodvfy_clean(path: Path) -> None:
    if validate.dciodvfy_available():
        report = validate.run_dciodvfy(path)
        assert validate.unexplained(report) == [], f"{path.name}: {validate.unexplained(report)}"


def _nifti_zhw(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def tiny_ct_prior(tmp_path_factory) -> Path:
    """A 32x32 CT prior folder with random weights (seeded without touching the global generator)."""
    config = PriorConfig(
        name="tiny-ct", modality="CT", image_size=32, architecture=default_architecture((16, 16, 16, 16)),
        schedule=default_schedule(100), intensity=ABDOMEN_WINDOW, weights_dtype="float32",
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prior = DiffusionPrior(config)
    folder = tmp_path_factory.mktemp("prior") / "tiny-ct"
    save_prior_dir(prior, config, folder)
    return folder


@pytest.fixture(scope="module")
def ct_nifti(tmp_path_factory) -> Path:
    """Three 40x48 phantom slices in HU, 2.5 mm apart, as NIfTI."""
    rng = np.random.default_rng(3)
    pixels = np.stack([ct_phantom((40, 48), rng).image for _ in range(3)]).astype(np.float32)
    affine = np.diag([8.0, 8.0, 2.5, 1.0])
    affine[:3, 3] = [-190.0, -150.0, 30.0]
    path = tmp_path_factory.mktemp("input") / "ct.nii.gz"
    return write_nifti(Volume(pixels, affine, None, "phantom"), path)


def _run_args(inp: Path, prior: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(inp), "--physics", "ct-sparse:views=20,noise=0.5", "--prior", str(prior),
            "--out", str(out), *TINY, *extra]


# ---------------------------------------------------------------------------------------- demo


@pytest.mark.parametrize("case", ["mri", "ct"])
def test_demo_writes_every_output(case, tmp_path, capsys):
    out = tmp_path / "demo"
    # TINY settings have no null model: an uncalibrated mask must be asked for by name
    assert main(["demo", "--case", case, "--out", str(out), *TINY, "--threshold", "p95"]) == 0
    printed = capsys.readouterr().out
    assert "image score" in printed and "nats/pixel" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "demo" and summary["demo"]["case"] == case
    assert summary["prior"]["name"] == {"mri": "mri-brain-flair-128", "ct": "ct-abdomen-128"}[case]
    assert summary["physics"]["spec"].startswith({"mri": "mri:", "ct": "ct-sparse:"}[case])
    assert summary["settings"]["samples"] == 1 and summary["seed"] == 0
    assert summary["windows"][0]["name"] in ("t:0.1,1", "full") and summary["top_blocks"]
    assert np.isfinite(summary["score"]["max_nats_per_pixel"]) and summary["timings"]["total_s"] > 0
    assert summary["versions"]["torch"] and summary["truth"]["mask_pixels"] > 0
    for name in ("summary.json", "recon.nii.gz", "klip.nii.gz", "report.png", "dicom/klip_pm.dcm",
                 "dicom/klip_seg.dcm", "dicom/klip_sc.dcm"):
        assert (out / name).is_file(), name

    source = read_dicom_series(out / "dicom" / "source")
    assert source.shape[0] == 1 and source.datasets[0].Modality == {"mri": "MR", "ct": "CT"}[case]
    if case == "ct":  # the lesion slice is a derived CT pointing at the shipped real slice
        ref = source.datasets[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref == SHIPPED_CT_UID
    recon = _nifti_zhw(out / "recon.nii.gz")
    klip = _nifti_zhw(out / "klip.nii.gz")
    assert recon.shape == klip.shape == source.shape and np.isfinite(klip).all()
    np.testing.assert_allclose(nib.load(out / "klip.nii.gz").affine, source.affine_ras, atol=1e-4)
    np.testing.assert_allclose(read_parametric_map(out / "dicom" / "klip_pm.dcm", source), klip, rtol=1e-6)
    series = read_dicom_series(out / "dicom" / "recon")
    ref = series.datasets[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    assert ref == source.sop_instance_uids[0]
    slope = float(series.datasets[0].get("RescaleSlope", 1.0))
    np.testing.assert_allclose(series.pixels, recon, atol=0.5 * slope + 1e-3)
    labels, names = read_seg(out / "dicom" / "klip_seg.dcm", source)
    assert names == {1: "OOD"} and labels.any() and summary["threshold"]["rule"].startswith("uncalibrated")
    assert int(labels.astype(bool).sum()) == summary["threshold"]["source_pixels_flagged"]
    sc = pydicom.dcmread(out / "dicom" / "klip_sc.dcm")
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.sop_instance_uids[0]
    hd.pm.ParametricMap.from_dataset(pydicom.dcmread(out / "dicom" / "klip_pm.dcm"))
    for path in sorted((out / "dicom").rglob("*.dcm")):
        _dciodvfy_clean(path)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]


# ---------------------------------------------------------------------------------------- run


def test_run_interrupted_resumes_to_the_same_outputs(tiny_ct_prior, ct_nifti, tmp_path, monkeypatch, capsys):
    import klip_med.pipeline.volume as run_module

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(_run_args(ct_nifti, tiny_ct_prior, whole)) == 0

    save = run_module.save_slice
    calls = []

    def save_then_stop(path, k, result):
        save(path, k, result)
        calls.append(k)
        raise KeyboardInterrupt  # the user presses Ctrl-C right after the first slice is saved

    monkeypatch.setattr(run_module, "save_slice", save_then_stop)
    assert main(_run_args(ct_nifti, tiny_ct_prior, resumed)) == 130
    assert calls == [0]
    assert sorted(p.name for p in (resumed / "slices").iterdir()) == ["run.json", "slice_00000.npz"]
    assert not (resumed / "summary.json").exists()
    first = (resumed / "slices" / "slice_00000.npz").read_bytes()

    monkeypatch.setattr(run_module, "save_slice", save)
    assert main(_run_args(ct_nifti, tiny_ct_prior, resumed)) == 0
    assert (resumed / "slices" / "slice_00000.npz").read_bytes() == first  # finished slice skipped
    for name in ("recon.nii.gz", "klip.nii.gz"):
        np.testing.assert_array_equal(_nifti_zhw(resumed / name), _nifti_zhw(whole / name))
    for k in range(3):
        with np.load(whole / "slices" / f"slice_{k:05d}.npz") as a, \
                np.load(resumed / "slices" / f"slice_{k:05d}.npz") as b:
            for key in ("recon", "klip", "baseline", "densities"):
                np.testing.assert_array_equal(a[key], b[key])
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, resumed))
    assert a["score"] == b["score"] and a["top_blocks"] == b["top_blocks"]
    assert b["timings"]["slices_computed_this_invocation"] == 2 and len(b["slices"]) == 3
    assert not (whole / "dicom").exists()  # NIfTI input: no DICOM objects
    assert (whole / "report.png").is_file()

    capsys.readouterr()  # a rerun with other settings is refused rather than mixed into the slices
    assert main(_run_args(ct_nifti, tiny_ct_prior, resumed, "--seed", "5")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klip-med: error: --out") and "settings" in err and "\n" not in err
    assert (resumed / "slices" / "slice_00000.npz").read_bytes() == first


def test_run_dicom_series_writes_dicom_objects(tiny_ct_prior, tmp_path):
    out = tmp_path / "out"
    args = _run_args(CT5N, tiny_ct_prior, out, "--slice-batch", "2", "--windows", "full", "t:0.3,1",
                     "--threshold", "p95")
    assert main(args) == 0
    source = read_dicom_series(CT5N)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["slices"]) == 5 and [w["name"] for w in summary["windows"]] == ["full", "t:0.3,1"]
    assert (out / "klip_windows" / "klip_1_t_0_3_1.nii.gz").is_file()
    klip = _nifti_zhw(out / "klip.nii.gz")
    np.testing.assert_allclose(read_parametric_map(out / "dicom" / "klip_pm.dcm", source), klip, rtol=1e-6)
    recon = read_dicom_series(out / "dicom" / "recon")
    assert recon.shape == source.shape
    assert [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in recon.datasets] == \
        list(source.sop_instance_uids)
    labels, _ = read_seg(out / "dicom" / "klip_seg.dcm", source)
    assert labels.shape == source.shape and labels.any()
    captures = sorted((out / "dicom" / "klip_sc").iterdir())
    assert len(captures) == 5
    for path in [out / "dicom" / "klip_pm.dcm", out / "dicom" / "klip_seg.dcm", captures[0]]:
        _dciodvfy_clean(path)


def test_without_a_null_model_no_mask_is_written_and_the_run_says_why(tiny_ct_prior, ct_nifti, tmp_path, capsys):
    """--threshold auto with no null model: no SEG (a percentile mask flags 5% of any scan)."""
    out = tmp_path / "out"
    assert main(_run_args(CT5N, tiny_ct_prior, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"]["kind"] == "none" and summary["threshold"]["blocks_flagged"] == 0
    assert "no null model" in summary["threshold"]["rule"] and summary["outputs"]["seg"] is None
    assert not (out / "dicom" / "klip_seg.dcm").exists() and (out / "dicom" / "klip_pm.dcm").is_file()
    assert "seg                (not written: no null model applies" in capsys.readouterr().out


def test_npz_input_conventions(tmp_path):
    image = np.random.default_rng(0).normal(40, 10, (2, 24, 20)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[1, 5:9, 5:9] = True
    path = tmp_path / "x.npz"
    np.savez(path, image=image, modality="CT", pixel_spacing_mm=[0.7, 0.8], slice_spacing_mm=3.0, mask=mask)
    inp = read_input(path)
    assert inp.format == "npz" and inp.modality == "CT" and inp.volume.shape == (2, 24, 20)
    np.testing.assert_allclose(inp.volume.spacing, (3.0, 0.7, 0.8))
    np.testing.assert_array_equal(inp.truth_mask, mask)
    np.savez(path, image=image[0])
    assert read_input(path).volume.shape == (1, 24, 20) and read_input(path).modality is None


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--input": "missing.nii.gz"}, r"--input: expected an existing .* found no such path"),
        ({"--prior": "no-such-prior"}, r"prior: expected a shipped prior name .* found 'no-such-prior'"),
        ({"--physics": "ct-sparse:views=many"}, r"--physics: .*views.* expected an integer >= 1, found 'many'"),
        ({"--physics": "xray:dose=1"}, r"--physics: .*expected a kind among"),
        ({"--out": "a_file.txt"}, r"--out: expected a folder .* found a file"),
        ({"--windows": "t:0.5"}, r"--windows: expected"),
        ({"--threshold": "high"}, r"--threshold: expected"),
        ({"--samples": "0"}, r"samples: expected a positive integer, found 0"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(change, message, tiny_ct_prior, ct_nifti, tmp_path, capsys,
                                             monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file.txt").write_text("not a folder")
    values = {"--input": str(ct_nifti), "--physics": "ct-sparse:views=20", "--prior": str(tiny_ct_prior),
              "--out": str(tmp_path / "out"), **change}
    argv = ["run", *TINY, *[x for kv in values.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("klip-med: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_demo_mistakes_and_help(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f"), *TINY]) == 2
    assert "--out: expected a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "demo" in text and "run" in text and "Exit" in text


@pytest.mark.parametrize("command", ["demo", "run", "calibrate", "eval", "bench"])
def test_shared_flags_are_spelled_the_same_in_every_sampling_command(command):
    from klip_med.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {"--samples", "--steps", "--sampler", "--seed", "--normalization", "--zeta", "--eta", "--gamma",
            "--cg-iters", "--windows", "--block-size", "--device"} <= flags, sorted(flags)


@pytest.mark.parametrize(("old", "new", "value", "dest", "expected"), [
    (["--block", "16"], "--block-size", "16", "block_size", 16),
    (["--window", "full", "--window", "t:0.3,1"], "--windows", None, "windows", ["full", "t:0.3,1"]),
])
def test_old_flag_spellings_work_with_a_deprecation_line(old, new, value, dest, expected, capsys):
    from klip_med.cli import build_parser

    args = build_parser().parse_args(["run", "--input", "x", "--physics", "mri:accel=4", "--prior", "p",
                                      "--out", "o", *old])
    assert getattr(args, dest) == expected
    err = capsys.readouterr().err
    assert f"{old[0]} is deprecated; use {new}" in err


def test_eval_block_sizes_old_spelling_and_list(capsys):
    from klip_med.cli import build_parser

    base = ["eval", "--manifest", "m.json", "--prior", "p", "--physics", "mri:accel=4", "--out", "o"]
    assert build_parser().parse_args([*base, "--block-size", "4,8"]).block_size == [4, 8]
    assert build_parser().parse_args([*base, "--block-sizes", "8,16"]).block_size == [8, 16]
    assert "--block-sizes is deprecated; use --block-size" in capsys.readouterr().err


def test_help_defaults_match_the_library():
    defaults = KLIPSettings()
    for key, value in cli.RUN_DEFAULTS.items():
        assert getattr(defaults, key) == value, key
    assert {f.name for f in dataclasses.fields(KLIPSettings)} >= set(cli.RUN_DEFAULTS)


def test_internal_errors_exit_1_with_traceback(monkeypatch, capsys, tiny_ct_prior, ct_nifti, tmp_path):
    import klip_med.pipeline.volume as run_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(run_module, "reconstruct_batch", broken)
    assert main(_run_args(ct_nifti, tiny_ct_prior, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err and "internal error" in err


# ---------------------------------------------------------------------------------------- null model


def test_calibrate_then_run_with_a_null_model(tiny_ct_prior, ct_nifti, tmp_path, capsys):
    """`klip-med calibrate` on the prior's own samples, then `run --null`: z-scores, p-values and a
    SEG thresholded at a false-positive rate; a null fitted under other physics is refused."""
    null_path = tmp_path / "null.json"
    flags = ["--samples", "1", "--steps", "2", "--block-size", "8", "--windows", "full"]
    assert main(["calibrate", "--prior", str(tiny_ct_prior), "--physics", "ct-sparse:views=20,noise=0.5",
                 "--prior-samples", "6", "--out", str(null_path), *flags]) == 0
    assert "wrote" in capsys.readouterr().out
    null = json.loads(null_path.read_text())
    assert null["format"] == "klip-med-null" and null["n_images"] == 6 and null["fingerprints"] == []
    assert null["conditioning"] == null["extra"]["selection"]["chosen"] in ("none", "position", "edge")
    assert 0 < null["effective_fraction"] <= 1 and null["spread"] == "predictive"
    assert null["conditions"]["physics"] == "ct-sparse:views=20,noise=0.5" and null["conditions"]["block_size"] == 8

    out = tmp_path / "out"
    run = ["run", "--input", str(ct_nifti), "--prior", str(tiny_ct_prior), "--out", str(out), "--no-progress",
           "--null", str(null_path), "--threshold", "fpr:0.2", *flags]
    assert main([*run, "--physics", "ct-sparse:views=20,noise=0.5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"]["kind"] == "fpr" and summary["threshold"]["value"] == 0.2
    levels = summary["null"]
    assert summary["null_model"] == str(null_path) and len(levels["max_z_per_slice"]) == 3
    assert all(0 < p <= 1 for p in levels["block_p_of_max_per_slice"]) and len(levels["slice_p"]) == 3
    # a slice's p-value corrects for its blocks: never below its maximum's block p-value; the volume's
    # (every block of every slice) never below the smallest slice p-value
    assert all(s >= b - 1e-12 for s, b in zip(levels["slice_p"], levels["block_p_of_max_per_slice"], strict=True))
    assert min(levels["slice_p"]) - 1e-12 <= levels["volume_p"] <= 1
    assert set(levels["meaning"]) == {"z", "block_p", "slice_p", "volume_p"}
    top = summary["top_blocks"][0]
    assert np.isfinite(top["null_z"]) and 0 < top["block_p"] <= top["slice_p"] <= 1
    z = _nifti_zhw(out / "klip_z.nii.gz")
    assert z.shape == (3, 40, 48) and np.isfinite(z).all()
    assert top["null_z"] == pytest.approx(max(summary["null"]["max_z_per_slice"]), abs=1e-4)  # ranked by z
    if top["null_z"] > 0:
        assert top["null_z"] == pytest.approx(float(z.max()), rel=1e-5)

    capsys.readouterr()
    assert main([*run, "--physics", "ct-sparse:views=30,noise=0.5", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "physics: fitted 'ct-sparse:views=20,noise=0.5', now 'ct-sparse:views=30,noise=0.5'" in err
    assert main([*run[:-4], "--threshold", "fpr:0.2", "--null", "none", *flags,
                 "--physics", "ct-sparse:views=20,noise=0.5", "--out", str(tmp_path / "o3")]) == 2
    assert "--threshold: expected a null model" in capsys.readouterr().err
