"""examples/gpu_session.sh, the one-call GPU session of issue 17, cannot rot: its dry run (every phase
for a few steps, on the CPU, tiny priors and packs) leaves the JSON, CSV and weights a device call
returns; its plan is the issue's; what it returns fits the device tool's limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import gpu_session  # noqa: E402

from klip_med import priors  # noqa: E402
from klip_med.data.manifest import file_sha256, read_manifest  # noqa: E402
from klip_med.data.phantom import ct_phantom, mr_phantom  # noqa: E402
from klip_med.priors.train import TrainSettings, train_prior  # noqa: E402
from klip_med.priors.train_data import write_train_pack  # noqa: E402

SIZE = 16


def test_the_device_plan_is_the_issues_list():
    entries = gpu_session.speed_entries("mri-brain-flair-128", "cuda", dry=False, backend="inductor")
    labels = [e.label for e in entries]
    assert len(set(labels)) == len(labels)
    runs = [e.settings for e in entries]
    assert {(s.image_size, s.samples, s.steps) for s in runs} == {(128, 4, 100)}
    assert {s.sampler for s in runs} == {"fast", "dps"} and {s.batch for s in runs} == {1, 8, 32}
    assert {s.compiled for s in runs} == {None, "default", "reduce-overhead"}
    assert {s.dtype for s in runs} == {"float32", "bfloat16"}
    assert any("deepinv" in s.compare and s.sampler == "dps" for s in runs)
    assert any("trajectory" in s.compare for s in runs)
    bf16_checked = [s for s in runs if s.dtype == "bfloat16" and s.check_bf16]
    assert {s.sampler for s in bf16_checked} == {"fast", "dps"}
    # eager entries first (they always fit), compiled ones after, each with the time its compile needs
    compiled = [i for i, s in enumerate(runs) if s.compile]
    assert compiled == list(range(compiled[0], len(runs))) and all(entries[i].min_seconds > 0 for i in compiled)


def test_returned_files_are_checked_against_the_device_limits(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    assert gpu_session.check_out(tmp_path) == []
    for k in range(8):
        (tmp_path / f"f{k}.txt").write_text("x")
    (tmp_path / "d" / "e" / "f").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f" / "deep.txt").write_text("x")
    with open(tmp_path / "big.bin", "wb") as fh:
        fh.truncate(17 * 1024 * 1024)
    problems = gpu_session.check_out(tmp_path)
    assert any("more than 8" in p for p in problems) and any("big.bin: 17.0 MiB" in p for p in problems)
    assert any("deep.txt: more than 2 folders down" in p for p in problems)
    assert gpu_session.parse_job("n:p.npz:init") == {"name": "n", "pack": "p.npz", "init": "init", "preset": None}
    assert gpu_session.parse_job("n:p.npz:-:mri-brain-flair-128")["init"] is None  # from scratch
    with pytest.raises(SystemExit, match="NAME:PACK:INIT"):
        gpu_session.parse_job("only-a-name")


# ---------------------------------------------------------------- the dry run


def _toy_job(tmp_path: Path, name: str, modality: str) -> tuple[Path, Path]:
    """A 16x16 training pack and a prior trained 3 steps on it (the prior the dry run continues)."""
    root = tmp_path / f"{name}-data"
    root.mkdir()
    rng = np.random.default_rng(1)
    if modality == "MR":
        array, key = (np.stack([mr_phantom(SIZE, rng).image for _ in range(6)]) * 255).astype(np.uint8), "flair"
    else:
        array, key = np.stack([ct_phantom(SIZE, rng).image for _ in range(6)]).round().astype(np.int16), "hu"
    np.savez(root / "v.npz", **{key: array})
    manifest = tmp_path / f"{name}.json"
    manifest.write_text(json.dumps({
        "schema": "klip-med-manifest", "version": 1, "name": f"{name}-data", "modality": modality,
        "array_key": key, "licence": "synthetic",
        "items": [{"file": "v.npz", "sha256": file_sha256(root / "v.npz"), "split": "train", "slices": "all"}]}))
    pack = tmp_path / f"{name}.npz"
    write_train_pack(read_manifest(manifest, root), pack)
    settings = TrainSettings(name=name, steps=3, batch_size=2, channels=(16, 16, 16, 16), warmup_steps=1,
                             log_every=1, weights_dtype="float32")
    train_prior(manifest, tmp_path / name, settings, root, progress=False)
    return pack, tmp_path / name


@pytest.mark.slow
def test_dry_run_leaves_what_a_device_call_returns(tmp_path):
    jobs = {name: _toy_job(tmp_path, name, modality) for name, modality in (("toy-mr", "MR"), ("toy-ct", "CT"))}
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(out), "KLIP_GS_WORK": str(work),
           "KLIP_GS_PY": sys.executable, "KLIP_GS_BENCH_PRIOR": str(jobs["toy-mr"][1]),
           # the MR prior is continued, the CT one trained from scratch (as a 256x256 prior would be)
           "KLIP_GS_JOBS": f"toy-mr:{jobs['toy-mr'][0]}:{jobs['toy-mr'][1]} toy-ct:{jobs['toy-ct'][0]}:-"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "gpu_session.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "session.json", "session.log",
                                                     "toy-ct.tar", "toy-mr.tar"]
    assert gpu_session.check_out(out) == []
    log = (out / "session.log").read_text()
    assert "phase 2: training" in log and "done in" in log

    bench = json.loads((out / "bench.json").read_text())
    statuses = {e["label"]: e["status"] for e in bench["entries"]}
    assert statuses == {label: "ok" for label in statuses} and len(statuses) == 11, statuses
    reports = {e["label"]: e["report"] for e in bench["entries"]}
    assert reports["fast-bf16-cudagraphs"]["compile"] == "reduce-overhead"
    assert reports["fast-bf16-cudagraphs"]["compile_backend"] == "eager"  # the dry run only traces
    assert 0 <= reports["fast-bf16-eager"]["bf16_klip_max_rel_error"] < 1
    assert isinstance(reports["dps-f32-eager"]["deepinv_psnr_db"], float)
    assert reports["dps-f32-eager"]["deepinv"]["samples"] == 2
    assert reports["fast-f32-eager"]["roofline"]["fraction_of_matmul_rate"] > 0
    assert len(bench["summary"]) == 11 and bench["dry_run"] is True
    probe = bench["train_probe"]
    assert [r["batch"] for r in probe["rows"]] == [2, 4] and probe["chosen_batch"] in (2, 4)

    session = json.loads((out / "session.json").read_text())
    assert session["mode"] == "dry" and session["out_problems"] == []
    train = session["train"]
    assert train["batch"] == probe["chosen_batch"] and train["warmup_steps"] == 200
    for name, (_, init) in jobs.items():
        job = train["jobs"][name]
        assert job["returncode"] == 0 and job["compile"] is True and job["summary"]["steps"] == 6
        assert session["verdicts"][name]["plateaued"] is None  # 9 steps: too few to judge
        with tarfile.open(out / f"{name}.tar") as archive:
            archive.extractall(tmp_path / "back", filter="data")
        back = priors.load(tmp_path / "back" / name)
        t = back.config.training
        assert t["runs"][-1]["compile"] == "default (eager)" and t["runs"][-1]["batch_size"] == train["batch"]
        curve = (tmp_path / "back" / name / "loss.csv").read_text().splitlines()
        if name == "toy-ct":  # from scratch
            assert t["steps_trained"] == 6 and t["continued_from"] is None and len(t["runs"]) == 1
            assert t["settings"]["warmup_steps"] == 500 and curve[-1].startswith("6,")
            continue
        assert t["steps_trained"] == 3 + 6 and t["continued_from"]["path"] == str(init)
        assert t["settings"]["warmup_steps"] == 200 and len(t["runs"]) == 2
        assert curve[:4] == (init / "loss.csv").read_text().splitlines() and curve[-1].startswith("9,")
        before = priors.load(init).state_dict()
        assert any(not torch.equal(v, before[k]) for k, v in back.state_dict().items())  # it trained
    # after the call, on the CPU: the returned priors unpack into loadable folders
    assert gpu_session.main(["unpack", str(out), "--into", str(tmp_path / "unpacked")]) == 0
    assert all(priors.load(tmp_path / "unpacked" / name).config.name == name for name in jobs)


@pytest.mark.slow
def test_every_module_the_session_imports_is_on_the_device_or_carried():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "gpu_session.py"), "import-check"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every module the session needs is on the device image or carried" in proc.stdout
