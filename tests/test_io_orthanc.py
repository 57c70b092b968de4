# Needs: apt-get install -y orthanc orthanc-dicomweb   (Orthanc server + its DICOMweb plugin)
"""Integration with a real PACS: start Orthanc (DICOMweb plugin) on localhost, store a source CT series
and every DICOM object klip_med.io writes from it, and check through QIDO-RS / WADO-RS metadata that
the outputs sit in the source's study, in new series, referencing the source series and instances.
The server is a child process of the test, with its storage in tmp_path, and is stopped afterwards."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from klip_med.io import (
    read_dicom_series,
    write_derived_series,
    write_fractional_seg,
    write_ood_seg,
    write_parametric_map,
    write_secondary_captures,
)

pytestmark = pytest.mark.slow

APT = "apt-get install -y orthanc orthanc-dicomweb"
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
DICOMWEB_PLUGIN = next(
    (p for p in (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                 *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))) if p.exists()),
    None,
)
CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"

# DICOM JSON tags
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"
N_SERIES_INSTANCES = "00201209"
REF_SERIES_SEQ, REF_INSTANCE_SEQ, REF_SOP_UID = "00081115", "0008114A", "00081155"
SOURCE_IMAGE_SEQ, REF_IMAGE_SEQ = "00082112", "00081140"


def _free_port() -> int:
    # Orthanc's HTTP server listens on every interface (access from other hosts is refused by
    # RemoteAccessAllowed=false), so the port must be free on all of them.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _request(url: str, data: bytes | None = None, content_type: str | None = None):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("Accept", "application/dicom+json, application/json")
    if content_type:
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
    return json.loads(body) if body else []


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def orthanc(tmp_path_factory):
    """Base URL of a fresh Orthanc (child process, storage in a tmp dir); stopped at teardown."""
    if ORTHANC is None or DICOMWEB_PLUGIN is None:
        pytest.skip(f"Orthanc or its DICOMweb plugin not installed ({APT})")
    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "klip_med_test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpServerEnabled": True,
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": _free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SaveJobs": False,
        "HttpDescribeErrors": True,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = root / "orthanc.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=root)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                plugins = _request(f"{base}/plugins")
                if "dicom-web" in plugins:
                    break
                pytest.fail(f"DICOMweb plugin not loaded (plugins: {plugins}):\n"
                            f"{log_path.read_text()[-3000:]}")
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not answer on {base}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        _stop(proc)
        assert proc.poll() is not None, "Orthanc still running after teardown"
        left = subprocess.run(["pgrep", "-f", str(config_path)], capture_output=True, text=True).stdout
        assert left.strip() == "", f"Orthanc processes left: {left}"


def _first(item: dict, tag: str):
    return item[tag]["Value"][0]


def _ref_sops(seq_items: list[dict]) -> set[str]:
    return {_first(it, REF_SOP_UID) for it in seq_items}


def test_outputs_stored_in_source_study_and_reference_source_series(orthanc, tmp_path):
    vol = read_dicom_series(CT5N)
    src_study = vol.datasets[0].StudyInstanceUID
    src_series = vol.datasets[0].SeriesInstanceUID
    src_sops = set(vol.sop_instance_uids)
    klip = np.random.default_rng(0).random(vol.shape).astype(np.float32) * 0.1
    klip[:, 4:8, 4:10] += 2.0
    out = tmp_path / "out"
    outputs = {  # name -> (files, how the output references the source)
        "derived": (write_derived_series(vol, vol.pixels + 1.0, out / "recon"), "image"),
        "parametric_map": ([write_parametric_map(vol, klip, out / "klip_pm.dcm")], "series"),
        "seg": ([write_ood_seg(vol, klip, 1.0, out / "ood_seg.dcm")], "series"),
        "fractional_seg": ([write_fractional_seg(vol, np.clip(klip / 2.5, 0, 1), out / "frac.dcm")],
                           "series"),
        "secondary_capture": (write_secondary_captures(vol, klip, out / "sc"), "image"),
    }

    # store: source + outputs through the REST API
    source_files = sorted(p for p in CT5N.iterdir() if p.is_file())
    for f in source_files + [p for files, _ in outputs.values() for p in files]:
        reply = _request(f"{orthanc}/instances", f.read_bytes(), "application/dicom")
        assert reply["Status"] == "Success", (f.name, reply)

    # QIDO-RS: one study, holding the source series and one new series per output
    studies = _request(f"{orthanc}/dicom-web/studies?StudyInstanceUID={src_study}")
    assert [_first(s, STUDY_UID) for s in studies] == [src_study]
    series = _request(f"{orthanc}/dicom-web/studies/{src_study}/series?includefield={N_SERIES_INSTANCES}")
    n_instances = {_first(s, SERIES_UID): int(_first(s, N_SERIES_INSTANCES)) for s in series}
    modality = {_first(s, SERIES_UID): _first(s, MODALITY) for s in series}
    assert n_instances[src_series] == len(source_files) == vol.shape[0]

    out_series: dict[str, str] = {}
    for name, (files, _) in outputs.items():
        dss = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        uids = {ds.SeriesInstanceUID for ds in dss}
        assert len(uids) == 1, f"{name}: several series {uids}"
        (uid,) = uids
        assert uid != src_series, f"{name} reuses the source series UID"
        assert uid not in out_series.values(), f"{name} shares its series with another output"
        assert uid in n_instances, f"{name} series {uid} not in the source study {src_study}"
        assert n_instances[uid] == len(files)
        assert modality[uid] == dss[0].Modality
        instances = _request(f"{orthanc}/dicom-web/studies/{src_study}/series/{uid}/instances")
        assert {_first(i, SOP_UID) for i in instances} == {ds.SOPInstanceUID for ds in dss}
        assert src_sops.isdisjoint(_first(i, SOP_UID) for i in instances)
        out_series[name] = uid
    assert set(n_instances) == {src_series, *out_series.values()}

    # WADO-RS metadata (as stored by Orthanc): each output references the source series / instances
    for name, uid in out_series.items():
        kind = outputs[name][1]
        metadata = _request(f"{orthanc}/dicom-web/studies/{src_study}/series/{uid}/metadata")
        assert len(metadata) == len(outputs[name][0])
        referenced: set[str] = set()
        for inst in metadata:
            assert _first(inst, STUDY_UID) == src_study and _first(inst, SERIES_UID) == uid
            if kind == "series":  # SEG / Parametric Map: ReferencedSeriesSequence (0008,1115)
                ref_series = inst[REF_SERIES_SEQ]["Value"]
                assert [_first(r, SERIES_UID) for r in ref_series] == [src_series], name
                referenced |= _ref_sops(ref_series[0][REF_INSTANCE_SEQ]["Value"])
            else:  # derived images / Secondary Capture: SourceImageSequence or ReferencedImageSequence
                items = inst.get(SOURCE_IMAGE_SEQ, {}).get("Value", []) + \
                    inst.get(REF_IMAGE_SEQ, {}).get("Value", [])
                assert items, f"{name}: instance {_first(inst, SOP_UID)} references no source image"
                refs = _ref_sops(items)
                assert refs <= src_sops, f"{name}: references outside the source series: {refs - src_sops}"
                referenced |= refs
        assert referenced == src_sops, f"{name}: source instances not referenced: {src_sops - referenced}"
