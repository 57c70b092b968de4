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
    "dicom_to_viewer_overlays.py": (["--samples", "1", "--steps", "2"],
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
