"""The example scripts run end to end with the tiniest settings (CPU, subprocess) and write their outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CASES = {
    "mri_tumour_localisation.py": (["--samples", "1", "--steps", "4"],
                                   ["mri_tumour_localisation.png", "maps.npz"]),
    "ct_sparse_view_lesion.py": (["--samples", "1", "--steps", "4"], ["ct_sparse_view_lesion.png", "maps.npz"]),
    "dicom_to_viewer_overlays.py": (["--samples", "1", "--steps", "2", "--threshold", "p99"],
                                    ["summary.json", "recon.nii.gz", "klip.nii.gz", "report.png",
                                     "dicom/klip_pm.dcm", "dicom/klip_seg.dcm"]),
    "deepinv_sampler_with_klip.py": (["--samples", "1", "--steps", "3"],
                                     ["deepinv_dps_klip.png", "deepinv_dps_klip.npz"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path):
    args, outputs = CASES[script]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done in" in proc.stdout
    for name in outputs:
        assert (out / name).is_file(), f"{script}: {name} missing\n{proc.stdout[-2000:]}"


@pytest.mark.slow
def test_research_scripts_run_on_a_cached_benchmark(tmp_path):
    """examples/research_klip_variants.py and figure_default_maps.py read a `klip-med eval` cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_eval import FAST_BASELINES, _tiny_manifest, tiny_prior

    from klip_med.eval.runner import run_benchmark
    from klip_med.pipeline import CALIBRATED_WINDOWS, KLIPSettings

    manifest, root = _tiny_manifest(tmp_path, size=32, patients=3)
    run = tmp_path / "run"
    windows = ("full", "t:0,0.1", *CALIBRATED_WINDOWS, "t:0.3,1", "t:0.6,1")
    run_benchmark(manifest, root, tiny_prior(32), "mri:accel=2,center=0.25,noise=0.01", "dev",
                  KLIPSettings(samples=2, steps=10, block_size=4, top_k=2), None, 4, run, windows=windows,
                  baselines=FAST_BASELINES, n_boot=20, min_body_fraction=0.2, log=None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    research = subprocess.run([sys.executable, str(EXAMPLES / "research_klip_variants.py"), str(run),
                               "--block-size", "4", "--n-boot", "20"], capture_output=True, text=True, timeout=600,
                              env=env)
    assert research.returncode == 0, research.stderr[-3000:]
    assert "stouffer t>=0.1 (9 windows)" in research.stdout and "ID-only" in research.stdout
    figure = subprocess.run([sys.executable, str(EXAMPLES / "figure_default_maps.py"), str(run),
                             str(tmp_path / "fig.png"), "--block-size", "4", "--n", "2"], capture_output=True,
                            text=True, timeout=600, env=env)
    assert figure.returncode == 0, figure.stderr[-3000:]
    assert (tmp_path / "fig.png").is_file()
    reattribution = subprocess.run([sys.executable, str(EXAMPLES / "research_reattribution.py"), str(run),
                                    "--block-size", "4", "--bootstrap", "20", "--centring", "none", "slice"],
                                   capture_output=True, text=True, timeout=600, env=env)
    assert reattribution.returncode == 0, reattribution.stderr[-3000:]
    assert "| klip_ra z (slice) |" in reattribution.stdout and "| klip z (none) |" in reattribution.stdout
    table = subprocess.run([sys.executable, str(EXAMPLES / "calibration_table.py"), "lopo", "lopo", str(run),
                            "centred", "lopo-centred", str(run), "--block-size", "4", "--bootstrap", "20"],
                           capture_output=True, text=True, timeout=600, env=env)
    assert table.returncode == 0, table.stderr[-3000:]
    assert table.stdout.count("\n| lopo |") == 1 and "\n| centred |" in table.stdout
