"""`klip-med batch`: many inputs through `run`'s code path, locally (fast) and on Ray (slow).

Each good input's outputs equal a serial `klip-med run` with the same seed; a corrupt input records
its error in OUT/index.jsonl and the others go on; a batch stopped mid-series (Ctrl-C, or a Ray
worker killed) finishes every series exactly once; a rerun of a finished batch writes nothing; the
core install needs no Ray, and `--engine ray` without it is one error naming the extra."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from klip_med.cli import main
from klip_med.data.manifest import file_sha256
from klip_med.data.phantom import ct_phantom
from klip_med.errors import KLIPMedError
from klip_med.io import Volume, write_nifti
from klip_med.pipeline.batch_inputs import input_signature, load_input, read_batch_inputs, stable_name
from klip_med.pipeline.engine import WORKER_PREFIX, EngineOptions, run_items
from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
from klip_med.priors.diffusion import DiffusionPrior, save_prior_dir
from klip_med.priors.intensity import ABDOMEN_WINDOW

PHYSICS = "ct-sparse:views=20,noise=0.5"
TINY = ["--samples", "1", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory) -> Path:
    """A 32x32 CT prior folder with random weights (seeded without touching the global generator)."""
    config = PriorConfig(
        name="tiny-ct", modality="CT", image_size=32, architecture=default_architecture((16, 16, 16, 16)),
        schedule=default_schedule(100), intensity=ABDOMEN_WINDOW, weights_dtype="float32",
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prior = DiffusionPrior(config)
    return save_prior_dir(prior, config, tmp_path_factory.mktemp("prior") / "tiny-ct")


def _phantoms(n: int, seed: int, shape=(40, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([ct_phantom(shape, rng).image for _ in range(n)]).astype(np.float32)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A list of four inputs: two NIfTI volumes, an .npz with a lesion mask, and a corrupt NIfTI."""
    folder = tmp_path_factory.mktemp("cohort")
    affine = np.diag([8.0, 8.0, 2.5, 1.0])
    write_nifti(Volume(_phantoms(2, 1), affine, None, "a"), folder / "a.nii.gz")
    (folder / "sub").mkdir()
    write_nifti(Volume(_phantoms(3, 2), affine, None, "c"), folder / "sub" / "c.nii.gz")
    image = _phantoms(3, 3, (36, 36))
    mask = np.zeros(image.shape, bool)
    mask[1, 10:16, 12:18] = True
    np.savez(folder / "b.npz", image=image, modality="CT", pixel_spacing_mm=[9.0, 9.0], mask=mask)
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    listing = folder / "inputs.txt"
    listing.write_text("# three good series and a corrupt one\na.nii.gz\n\nb.npz\nbroken.nii.gz\nsub/c.nii.gz\n")
    return listing


def _batch_args(listing: Path, prior: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", "--inputs", str(listing), "--physics", PHYSICS, "--prior", str(prior), "--out", str(out),
            *TINY, *extra]


def _index(out: Path) -> tuple[dict[str, dict], dict]:
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert "summary" in rows[-1] and all("summary" not in r for r in rows[:-1])
    return {Path(r["input"]).name: r for r in rows[:-1]}, rows[-1]["summary"]


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> modification time in ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_as_serial_run(series: Path, serial: Path) -> None:
    assert set(_files(series)) == set(_files(serial))  # exactly the files `run` writes
    for slice_file in sorted((serial / "slices").glob("slice_*.npz")):
        with np.load(slice_file) as a, np.load(series / "slices" / slice_file.name) as b:
            for key in a.files:
                if key != "record":
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{slice_file.name}: {key}")
    import nibabel as nib

    for name in ("recon.nii.gz", "klip.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(series / name).dataobj),
                                      np.asarray(nib.load(serial / name).dataobj))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (serial, series))
    assert a["score"] == b["score"] and a["top_blocks"] == b["top_blocks"] and a["threshold"] == b["threshold"]
    assert b["batch"]["name"] == series.name and "batch" not in a


@pytest.fixture(scope="module")
def serial_runs(tiny_prior, cohort, tmp_path_factory) -> dict[str, Path]:
    """`klip-med run` on each good input, one torch thread (as every batch worker here)."""
    out = tmp_path_factory.mktemp("serial")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for rel in ("a.nii.gz", "b.npz", "sub/c.nii.gz"):
            runs[Path(rel).name] = out / Path(rel).name
            assert main(["run", "--input", str(cohort.parent / rel), "--physics", PHYSICS, "--prior", str(tiny_prior),
                         "--out", str(runs[Path(rel).name]), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return runs


# ------------------------------------------------------------------------------------------ local engine


def test_local_batch_equals_serial_runs_records_the_corrupt_input_and_reruns_nothing(
        tiny_prior, cohort, serial_runs, tmp_path, capsys):
    out = tmp_path / "batch"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_batch_args(cohort, tiny_prior, out)) == 2  # one series failed
        printed = capsys.readouterr()
        assert "1 of 4 failed" in printed.err and str(out / "index.jsonl") in printed.err
        assert printed.out.count("] done ") == 3 and printed.out.count("] failed ") == 1
        lines, summary = _index(out)
        assert list(lines) == ["a.nii.gz", "b.npz", "broken.nii.gz", "c.nii.gz"]  # list order
        assert summary["done"] == 3 and summary["failed"] == 1 and summary["skipped"] == summary["pending"] == 0
        assert summary["series_per_hour"] > 0 and summary["engine"] == "local"
        broken = lines["broken.nii.gz"]
        assert broken["status"] == "failed" and "broken.nii.gz" in broken["error"] and broken["score"] is None
        assert not (out / broken["name"]).exists()  # nothing written for it
        for name, serial in serial_runs.items():
            line = lines[name]
            assert line["status"] == "done" and line["error"] is None and line["worker"].startswith("local pid")
            assert line["slices"] == line["slices_computed"] == {"a.nii.gz": 2, "b.npz": 3, "c.nii.gz": 3}[name]
            assert line["device"] == "cpu" and line["seconds"] > 0 and line["volume_p"] is None and line["slice_p"] is None  # no null model
            _assert_same_as_serial_run(out / line["name"], serial)
            assert line["score"] == json.loads((serial / "summary.json").read_text())["score"]["max_nats_per_pixel"]

        before = _files(out)
        assert main(_batch_args(cohort, tiny_prior, out)) == 2  # the corrupt input fails again, nothing else runs
        lines, summary = _index(out)
        assert summary["skipped"] == 3 and summary["failed"] == 1 and summary["done"] == 0
        after = _files(out)
        assert {k: v for k, v in after.items() if k != "index.jsonl"} == \
            {k: v for k, v in before.items() if k != "index.jsonl"}
    finally:
        torch.set_num_threads(threads)


def test_batch_stopped_mid_series_resumes_every_series_exactly_once(tiny_prior, cohort, tmp_path, monkeypatch):
    import klip_med.pipeline.volume as volume_module

    out = tmp_path / "batch"
    save, saved = volume_module.save_slice, []

    def save_then_stop(path, k, result):
        save(path, k, result)
        saved.append(path)
        if len(saved) == 3:  # the first slice of the second series (b.npz)
            raise KeyboardInterrupt

    monkeypatch.setattr(volume_module, "save_slice", save_then_stop)
    assert main(_batch_args(cohort, tiny_prior, out)) == 130
    lines, summary = _index(out)
    assert [lines[n]["status"] for n in ("a.nii.gz", "b.npz", "broken.nii.gz", "c.nii.gz")] == \
        ["done", "pending", "pending", "pending"] and summary["pending"] == 3
    partial = out / lines["b.npz"]["name"]
    assert not (partial / "summary.json").exists() and len(list((partial / "slices").glob("slice_*.npz"))) == 1
    (partial / "slices" / ".slice_00001.npz.x1y2.tmp.npz").write_bytes(b"half a slice")  # a killed writer's leftover

    monkeypatch.setattr(volume_module, "save_slice", save)
    assert main(_batch_args(cohort, tiny_prior, out)) == 2
    lines, summary = _index(out)
    assert [lines[n]["status"] for n in ("a.nii.gz", "b.npz", "broken.nii.gz", "c.nii.gz")] == \
        ["skipped", "done", "failed", "done"]
    assert lines["b.npz"]["slices_computed"] == 2 and lines["b.npz"]["slices"] == 3  # resumed, not redone
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no hidden temporary file left


def test_network_options_are_opt_in_recorded_and_never_mixed_with_default_slices(tiny_prior, cohort, serial_runs,
                                                                                   tmp_path, capsys):
    import nibabel as nib

    listing = tmp_path / "one.txt"
    listing.write_text(f"{cohort.parent / 'a.nii.gz'}\n")
    out = tmp_path / "batch"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_batch_args(listing, tiny_prior, out, "--channels-last")) == 0
        line = _index(out)[0]["a.nii.gz"]
        series = out / line["name"]
        summary = json.loads((series / "summary.json").read_text())
        assert summary["network"] == {"channels_last": True}
        serial = serial_runs["a.nii.gz"]
        for name in ("recon.nii.gz", "klip.nii.gz"):  # float32 rounding apart
            np.testing.assert_allclose(np.asarray(nib.load(series / name).dataobj),
                                       np.asarray(nib.load(serial / name).dataobj), rtol=1e-3, atol=1e-3)
        capsys.readouterr()
        assert main(_batch_args(listing, tiny_prior, out)) == 2  # the default request is another request ...
        line = _index(out)[0]["a.nii.gz"]
        assert line["status"] == "failed" and "differs in network" in line["error"]  # ... refused, not mixed
        assert json.loads((series / "summary.json").read_text())["network"] == {"channels_last": True}
    finally:
        torch.set_num_threads(threads)


def test_bundled_case_example_writes_a_cohort(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "batch_bundled_case.py"
    proc = subprocess.run([sys.executable, str(script), "--copies", "2", "--out", str(tmp_path / "cohort")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    inputs = read_batch_inputs(tmp_path / "cohort" / "inputs.txt")
    assert len(inputs) == 2 and inputs[0].name != inputs[1].name
    from klip_med.io.inputs import read_input

    first = read_input(inputs[0].location)
    assert first.modality == "MR" and first.volume.shape == (1, 128, 128) and first.truth_mask.any()
    assert first.mr_scale > 0


def test_engine_captures_each_items_error_and_reports_as_items_end():
    seen = []
    outcomes = run_items(Doubler, [("a", 1), ("b", "x"), ("c", -1), ("d", 4)], EngineOptions(), seen.append)
    assert [o.key for o in seen] == ["a", "b", "c", "d"] and seen == outcomes
    a, b, c, d = outcomes
    assert a.ok and a.value == 2 and d.value == 8 and a.worker.startswith("local pid")
    assert b.error == "TypeError: not a number: 'x'" and "Traceback" in b.traceback
    assert c.error == "item: expected a positive number, found -1" and c.traceback is None  # bad input
    with pytest.raises(KLIPMedError, match="unique keys"):
        run_items(Doubler, [("a", 1), ("a", 2)], EngineOptions())
    with pytest.raises(KLIPMedError, match="--workers: expected 1 with --engine local"):
        EngineOptions("local", workers=2)


class Doubler:
    """A picklable worker factory for the engine tests."""

    def __new__(cls):
        from klip_med.errors import expect

        def double(value):
            if not isinstance(value, int):
                raise TypeError(f"not a number: {value!r}")
            expect(value > 0, "item", "a positive number", value)
            return 2 * value

        return double


# ------------------------------------------------------------------------------------------ inputs


def test_list_names_are_stable_and_mistakes_are_refused(tmp_path, cohort):
    inputs = read_batch_inputs(cohort)
    assert [i.source for i in inputs] == ["a.nii.gz", "b.npz", "broken.nii.gz", "sub/c.nii.gz"]
    assert inputs[0].name == stable_name("a.nii.gz", "a.nii.gz") and inputs[0].name.startswith("a-")
    assert inputs[3].location == str((cohort.parent / "sub" / "c.nii.gz").resolve())
    reordered = tmp_path / "other.txt"
    reordered.write_text(f"https://pacs.example/studies/1.2/series/1.2.3\n{cohort.parent / 'b.npz'}\n"
                         f"{cohort.parent / 'sub'}\n")
    url, b, sub = read_batch_inputs(reordered)
    assert url.name.startswith("1.2.3-") and url.location == url.source  # URLs go to read_input as written
    assert input_signature(url) == {"url": url.location}
    assert input_signature(b)["size"] == (cohort.parent / "b.npz").stat().st_size
    assert "files_sha256" in input_signature(sub)
    for text, match in [("a.nii.gz\n./a.nii.gz\n", "line 2: expected each input once"),
                        ("# nothing\n\n", "expected at least one input line")]:
        bad = cohort.parent / "bad.txt"
        bad.write_text(text)
        with pytest.raises(KLIPMedError, match=match):
            read_batch_inputs(bad)
    with pytest.raises(KLIPMedError, match="--split / --data-root: expected only with a data manifest"):
        read_batch_inputs(cohort, split="dev")
    with pytest.raises(KLIPMedError, match="--inputs: expected a text file"):
        read_batch_inputs(tmp_path / "missing.txt")


def test_manifest_items_become_inputs_with_slices_masks_and_spacing(tmp_path, tiny_prior):
    from klip_med import priors

    root = tmp_path / "data"
    (root / "p").mkdir(parents=True)
    hu = _phantoms(5, 4, (32, 32)).astype(np.int16)
    mask = np.zeros(hu.shape, bool)
    mask[2, 4:8, 4:8] = True
    np.savez(root / "p" / "p1.npz", hu=hu, mask=mask, pixel_spacing_mm=[2.5, 2.5], z_mm=np.arange(5) * 0.8)
    sha = file_sha256(root / "p" / "p1.npz")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({
        "schema": "klip-med-manifest", "version": 1, "name": "toy-ct", "modality": "CT", "array_key": "hu",
        "mask_key": "mask", "items": [
            {"file": "p/p1.npz", "sha256": sha, "split": "dev", "slices": [1, 2, 3], "labels": {"patient": "P1"}},
            {"file": "p/p1.npz", "sha256": sha, "split": "test", "slices": {"start": 3, "stop": 5}}]}))
    inputs = read_batch_inputs(manifest, root)
    assert [i.source for i in inputs] == ["toy-ct:p/p1.npz[dev]", "toy-ct:p/p1.npz[test]"]
    assert inputs[0].name.startswith("P1-") and inputs[1].name.startswith("p1-")
    assert [i.name for i in read_batch_inputs(manifest, root, split="test")] == [inputs[1].name]
    run_input = load_input(inputs[0], priors.load(str(tiny_prior)))
    np.testing.assert_array_equal(run_input.volume.pixels, hu[1:4].astype(np.float32))
    np.testing.assert_array_equal(run_input.truth_mask, mask[1:4])
    np.testing.assert_allclose(run_input.volume.spacing, (0.8, 2.5, 2.5))
    assert run_input.modality == "CT" and run_input.format == "manifest" and run_input.mr_scale is None
    assert input_signature(inputs[0]) == {"file": "p/p1.npz", "sha256": sha, "slices": [1, 2, 3]}


# ------------------------------------------------------------------------------------------ without Ray


def test_core_install_needs_no_ray_and_engine_ray_names_the_extra(tiny_prior, cohort, tmp_path, monkeypatch, capsys):
    code = ("import sys; import klip_med, klip_med.cli, klip_med.pipeline.batch, klip_med.pipeline.engine; "
            "from klip_med.cli import build_parser; build_parser(); assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["run", "--input", str(cohort.parent / "a.nii.gz"), "--physics", PHYSICS, "--prior", str(tiny_prior),
                 "--out", str(tmp_path / "run"), *TINY]) == 0
    capsys.readouterr()
    assert main(_batch_args(cohort, tiny_prior, tmp_path / "b", "--engine", "ray", "--workers", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klip-med: error: --engine ray: expected the optional package 'ray'") and "\n" not in err
    assert "pip install 'klip-med[ray]'" in err and not (tmp_path / "b").exists()
    assert main(_batch_args(cohort, tiny_prior, tmp_path / "b", "--workers", "2")) == 2
    assert "--workers: expected 1 with --engine local" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ Ray (slow)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_two_workers_survive_a_killed_worker_and_rerun_nothing(local_ray, tiny_prior, cohort, serial_runs,
                                                                    tmp_path):
    ray = local_ray
    listing = tmp_path / "inputs.txt"
    long_series = tmp_path / "long.npz"
    np.savez(long_series, image=_phantoms(30, 5, (32, 32)), modality="CT")
    listing.write_text("".join(f"{cohort.parent / rel}\n" for rel in ("a.nii.gz", "b.npz", "broken.nii.gz",
                                                                     "sub/c.nii.gz")) + f"{long_series}\n")
    out = tmp_path / "batch"
    args = _batch_args(listing, tiny_prior, out, "--engine", "ray", "--workers", "2")
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(args)))
    thread.start()
    long_folder = out / read_batch_inputs(listing)[-1].name
    killed = []
    deadline = time.monotonic() + 600
    while thread.is_alive() and not killed and time.monotonic() < deadline:
        if any((long_folder / "slices").glob("slice_*.npz")) and not (long_folder / "summary.json").exists():
            for name in ray.util.list_named_actors():
                if name.startswith(WORKER_PREFIX):
                    ray.kill(ray.get_actor(name), no_restart=False)  # as if the process crashed: Ray restarts it
                    killed.append(name)
        time.sleep(0.02)
    thread.join(timeout=600)
    assert killed and codes == [2]  # the corrupt input failed; everything else finished
    lines, summary = _index(out)
    assert summary["done"] == 4 and summary["failed"] == 1 and len(lines) == 5
    assert "broken.nii.gz" in lines["broken.nii.gz"]["error"]
    long_line = lines["long.npz"]
    assert long_line["slices"] == 30 and long_line["slices_computed"] < 30  # resumed after the kill, not redone
    assert len(list((long_folder / "slices").glob("slice_*.npz"))) == 30
    assert not [p for p in out.rglob(".*") if p.is_file()]  # the killed writer's temporary files are gone
    for name, serial in serial_runs.items():
        assert lines[name]["worker"].startswith(WORKER_PREFIX)
        _assert_same_as_serial_run(out / lines[name]["name"], serial)

    before = _files(out)
    assert main(args) == 2  # the rerun: only the corrupt input is tried again
    lines, summary = _index(out)
    assert summary["skipped"] == 4 and summary["done"] == 0 and summary["failed"] == 1
    assert {k: v for k, v in _files(out).items() if k != "index.jsonl"} == \
        {k: v for k, v in before.items() if k != "index.jsonl"}


class Crasher:
    """A worker factory whose item 0 kills the worker process (as the kernel's OOM killer would)."""

    def __new__(cls):
        import os

        def run(value):
            if value == 0:
                os._exit(1)
            return 2 * value

        return run


@pytest.mark.slow
def test_ray_engine_bounds_the_retries_of_an_item_that_kills_its_worker(local_ray):
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    seen = []
    outcomes = run_items(Crasher, [("a", 1), ("crash", 0), ("b", 3), ("c", 4)],
                         EngineOptions("ray", workers=2, retries=1), seen.append)
    assert seen == outcomes and sorted(o.key for o in outcomes) == ["a", "b", "c", "crash"]
    by_key = {o.key: o for o in outcomes}
    assert [by_key[k].value for k in "abc"] == [2, 6, 8] and all(by_key[k].ok for k in "abc")
    assert by_key["crash"].error.startswith("its worker died 2 times on this item")
    assert by_key["crash"].value is None


def test_series_urls_in_a_list_are_read_with_the_batch_credential_never_written(tiny_prior, tmp_path, monkeypatch,
                                                                                   capsys):
    """A list of DICOMweb series URLs: --auth reaches every worker; without it the 401 is that series'
    error in the index; the secret is in no output file and on no console line."""
    import pydicom
    from orthanc_server import MISSING, assert_stopped, start_orthanc

    if MISSING:
        pytest.skip(MISSING)
    ct5n = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    secret = "batch-s3cr3t-password"
    server = start_orthanc(tmp_path / "orthanc", users={"klip": secret})
    try:
        server.upload(sorted(ct5n.iterdir()))
        first = pydicom.dcmread(next(iter(sorted(ct5n.iterdir()))), stop_before_pixels=True)
        url = f"{server.dicomweb}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        listing = tmp_path / "series.txt"
        listing.write_text(url + "\n")
        assert main(_batch_args(listing, tiny_prior, tmp_path / "open")) == 2  # no credential: that series fails
        rows, summary = _index(tmp_path / "open")
        (row,) = rows.values()
        assert row["status"] == "failed" and "HTTP 401" in row["error"] and summary["failed"] == 1
        monkeypatch.setenv("KLIP_TEST_BATCH_AUTH", f"klip:{secret}")
        out = tmp_path / "auth"
        assert main(_batch_args(listing, tiny_prior, out, "--auth", "basic:env:KLIP_TEST_BATCH_AUTH",
                                "--retries", "0")) == 0
        rows, summary = _index(out)
        (row,) = rows.values()
        assert row["status"] == "done" and row["slices"] == 5 and summary["done"] == 1
        for f in out.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
        printed = capsys.readouterr()
        assert secret not in printed.out and secret not in printed.err
    finally:
        server.stop()
        assert_stopped(server)
