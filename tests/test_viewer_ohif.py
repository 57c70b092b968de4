# Needs: apt-get install -y orthanc orthanc-dicomweb chromium   and node + npm (npm registry reachable once)
"""The reviewer's path, proven in a real viewer in a real browser.

A throwaway Orthanc on 127.0.0.1 holds pydicom's bundled CT series; ``klip-med run`` reads it with
``--input`` (QIDO-RS / WADO-RS) and writes the outputs back with ``--push`` (STOW-RS); the prebuilt
OHIF viewer (npm ``@ohif/app`` 3.13, installed into the git-ignored ``.viewer/``) is served with that
Orthanc as its data source (examples/serve_ohif.py); headless Chromium, driven by playwright-core
(examples/ohif_screenshots.mjs), opens the study and takes three screenshots of the same slice: the
source alone, the source with the SEG, the source with the Parametric Map.

The assertions read the pixels: the viewer reports where it drew the slice (world -> canvas), so each
source voxel is found on the screenshots; the SEG changes the colour of exactly the voxels of its
mask on that slice and nothing else, and the PM's colour strength follows the map's values on that
slice (and not those of another slice). Every process started is stopped and checked gone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_server import MISSING, assert_stopped, start_orthanc
from scipy.stats import spearmanr

from klip_med.io import read_dicom_series, read_parametric_map, read_seg

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VIEWER = ROOT / ".viewer"
OHIF_APP = "@ohif/app@3.13.2"
PLAYWRIGHT = "playwright-core@1.65.1"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def install_viewer() -> tuple[Path, Path]:
    """OHIF's prebuilt dist/ and playwright-core in .viewer/ (git-ignored), fetched with npm once."""
    dist = VIEWER / "package" / "dist"
    driver = VIEWER / "node_modules" / "playwright-core" / "index.mjs"
    VIEWER.mkdir(exist_ok=True)
    steps = []
    if not (dist / "index.html").is_file():
        steps.append(["npm", "pack", "--silent", OHIF_APP])
    if not driver.is_file():
        steps.append(["npm", "install", "--no-save", "--no-audit", "--no-fund", PLAYWRIGHT])
    for step in steps:
        done = subprocess.run(step, cwd=VIEWER, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"could not install {step[-1]} with npm: {done.stderr.strip()[-300:]}")
        if step[1] == "pack":
            (tarball,) = VIEWER.glob("ohif-app-*.tgz")
            subprocess.run(["tar", "xzf", tarball.name], cwd=VIEWER, check=True)
            tarball.unlink()
    return dist, driver


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def serve_ohif(dist: Path, dicomweb: str, folder: Path) -> tuple[subprocess.Popen, str]:
    port_file = folder / "ohif.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "serve_ohif.py"), "--dist", str(dist),
                             "--dicomweb", dicomweb, "--port-file", str(port_file)],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "serve_ohif.log", "wb"))
    deadline = time.monotonic() + 30
    while not port_file.is_file() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"serve_ohif.py did not start: {(folder / 'serve_ohif.log').read_text()}")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def voxel_colours(png: Path, shot: dict, shape: tuple[int, int], half: int = 3) -> np.ndarray:
    """Mean RGB of a (2*half+1)^2 patch at every voxel centre of the slice shown: (H, W, 3)."""
    from matplotlib.image import imread

    image = imread(png)[..., :3].astype(np.float64) * 255.0
    (x0, y0), (x1, y1), (x2, y2) = shot["points"]  # canvas position of voxels (0,0), (0,W-1), (H-1,0)
    left, top = shot["canvas"][:2]
    H, W = shape
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    xs = np.rint(left + x0 + (x1 - x0) * cols / (W - 1) + (x2 - x0) * rows / (H - 1)).astype(int)
    ys = np.rint(top + y0 + (y1 - y0) * cols / (W - 1) + (y2 - y0) * rows / (H - 1)).astype(int)
    assert xs.min() - half >= 0 and ys.min() - half >= 0, "slice drawn outside the screenshot"
    assert xs.max() + half < image.shape[1] and ys.max() + half < image.shape[0], "slice drawn outside"
    out = np.zeros((H, W, 3))
    for r in range(H):
        for c in range(W):
            out[r, c] = image[ys[r, c] - half:ys[r, c] + half + 1, xs[r, c] - half:xs[r, c] + half + 1].mean((0, 1))
    return out


def outside_points(shot: dict, shape: tuple[int, int], margin_px: float = 40.0) -> list[tuple[int, int]]:
    """Screenshot pixels inside the canvas but clearly outside the drawn slice (left / right of it)."""
    (x0, y0), (x1, _), (_, y2) = shot["points"]
    left, top, width, height = shot["canvas"]
    W = shape[1]
    step = (x1 - x0) / (W - 1)
    ys = np.linspace(top + max(y0, 0) + 10, top + min(y2, height) - 10, 8)
    xs = [left + x0 - step / 2 - margin_px, left + x1 + step / 2 + margin_px]
    return [(int(x), int(y)) for x in xs for y in ys if left + 5 < x < left + width - 5]


def test_ohif_shows_seg_and_pm_on_the_source(tmp_path):
    if MISSING:
        pytest.skip(MISSING)
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install -y nodejs npm)")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    dist, driver = install_viewer()
    started = time.perf_counter()
    server = start_orthanc(tmp_path / "orthanc")
    ohif = None
    user_data = tmp_path / "chromium-profile"
    try:
        server.upload(sorted(CT5N.iterdir()))
        source = read_dicom_series(CT5N)
        first = source.datasets[0]
        url = f"{server.dicomweb}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        out = tmp_path / "out"
        t0 = time.perf_counter()
        run = subprocess.run(
            [str(Path(sys.executable).with_name("klip-med")), "run", "--input", url, "--push", server.dicomweb,
             "--physics", "ct-sparse:views=60", "--prior", "ct-abdomen-128", "--samples", "1", "--steps", "3",
             "--null", "none", "--threshold", "p95", "--out", str(out), "--no-progress"],  # an uncalibrated SEG
            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        run_s = time.perf_counter() - t0
        assert run.returncode == 0, run.stderr[-3000:]
        assert "pushed 12 DICOM files" in run.stdout, run.stdout[-2000:]

        mask, _ = read_seg(out / "dicom" / "klip_seg.dcm", source)
        pm = read_parametric_map(out / "dicom" / "klip_pm.dcm", source)
        k = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))  # the slice with the most SEG voxels
        Z, H, W = source.shape
        points = source.voxel_to_patient(np.array([[k, 0, 0], [k, 0, W - 1], [k, H - 1, 0]], float))
        ohif, viewer = serve_ohif(dist, server.dicomweb, tmp_path)
        shots_dir = tmp_path / "shots"
        shots_dir.mkdir()
        job = {"viewer": viewer, "study": first.StudyInstanceUID, "source": first.SeriesInstanceUID,
               "seg": pydicom.dcmread(out / "dicom" / "klip_seg.dcm", stop_before_pixels=True).SeriesInstanceUID,
               "pm": pydicom.dcmread(out / "dicom" / "klip_pm.dcm", stop_before_pixels=True).SeriesInstanceUID,
               "points": points.tolist(), "out": str(shots_dir), "chromium": CHROMIUM,
               "playwright": str(driver), "user_data_dir": str(user_data)}
        (tmp_path / "job.json").write_text(json.dumps(job))
        t0 = time.perf_counter()
        browse = subprocess.run(["node", str(ROOT / "examples" / "ohif_screenshots.mjs"), str(tmp_path / "job.json")],
                                capture_output=True, text=True, timeout=400)
        browser_s = time.perf_counter() - t0
        report = json.loads((shots_dir / "shots.json").read_text())
        assert browse.returncode == 0, f"{browse.stdout[-2000:]}\n{browse.stderr[-2000:]}\n{report['problems']}"
        shots = report["shots"]
        for name in ("source", "seg", "pm"):  # each shot shows the chosen slice
            assert shots[name]["distanceMm"] < 0.25 * source.spacing[0], (name, shots[name])
        assert shots["seg"]["segmentations"], "OHIF loaded no segmentation"
        assert shots["pm"]["viewportType"] == "orthographic" and len(shots["pm"]["actors"]) == 2

        base = voxel_colours(shots_dir / "source.png", shots["source"], (H, W))
        seg = voxel_colours(shots_dir / "seg.png", shots["seg"], (H, W))
        pmap = voxel_colours(shots_dir / "pm.png", shots["pm"], (H, W))
        from matplotlib.image import imread

        images = {n: imread(shots_dir / f"{n}.png")[..., :3] * 255.0 for n in ("source", "seg", "pm")}

        # SEG: the overlay colours exactly the mask's voxels of this slice, nothing else
        change = np.abs(seg - base).sum(-1)
        inside = mask[k] > 0
        assert change[inside].min() > 40, f"SEG voxels not drawn: {np.sort(change[inside])[:5]}"
        assert change[~inside].max() < 15, f"overlay outside the SEG: {np.sort(change[~inside])[-5:]}"
        agreement = [float(((change > 27.5) == (mask[j] > 0)).mean()) for j in range(Z)]
        assert agreement[k] == 1.0 and all(a < 1.0 for j, a in enumerate(agreement) if j != k and
                                            (mask[j] != mask[k]).any()), agreement
        for name in ("seg", "pm"):  # and nothing beside the slice
            for x, y in outside_points(shots[name], (H, W)):
                assert np.abs(images[name][y, x] - images["source"][y, x]).sum() < 15, (name, x, y)

        # PM: colour strength follows this slice's values (0 = transparent .. top = full colour)
        strength = np.abs(pmap - base).sum(-1)
        top = float(np.percentile(pm, 99.5))
        rho = [spearmanr(np.clip(pm[j] / top, 0, 1).ravel(), strength.ravel()).correlation for j in range(Z)]
        assert rho[k] > 0.6 and rho[k] == max(rho), rho
        slice_top = pm[k] >= float(np.percentile(pm[k], 99.5))  # this slice's strongest values
        assert strength[slice_top].min() > min(60.0, float(np.percentile(strength, 95))), \
            "the top of the map is not drawn among the strongest colours"

        print(f"klip-med run (pull + push) {run_s:.1f} s; browser {browser_s:.1f} s; "
              f"total {time.perf_counter() - started:.1f} s; SEG agreement {agreement}; PM rho {np.round(rho, 3)}")
    finally:
        if ohif is not None:
            _stop(ohif)
        server.stop()
        assert_stopped(server)
        left = subprocess.run(["pgrep", "-f", str(user_data)], capture_output=True, text=True).stdout.strip()
        assert left == "", f"Chromium processes left: {left}"
        if ohif is not None:
            assert ohif.poll() is not None, "serve_ohif.py still running"
