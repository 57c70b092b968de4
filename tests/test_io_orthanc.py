# Needs: apt-get install -y orthanc orthanc-dicomweb   (Orthanc server + its DICOMweb plugin)
"""Integration with a real PACS: start Orthanc (DICOMweb plugin) on localhost, store a source CT series
and every DICOM object klip_med.io writes from it, and check through QIDO-RS / WADO-RS metadata that
the outputs sit in the source's study, in new series, referencing the source series and instances.
Then the whole round trip through the command line: ``klip-med run --input <DICOMweb series> --push
<DICOMweb root>`` with basic auth from an environment variable, and a push the server refuses.
The servers are child processes of the test, with storage in tmp_path, stopped afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from orthanc_server import MISSING, Orthanc, assert_stopped, start_orthanc

from klip_med.io import (
    read_dicom_series,
    read_parametric_map,
    read_seg,
    write_derived_series,
    write_fractional_seg,
    write_ood_seg,
    write_parametric_map,
    write_secondary_captures,
)

pytestmark = pytest.mark.slow

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"

# DICOM JSON tags
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"
N_SERIES_INSTANCES = "00201209"
REF_SERIES_SEQ, REF_INSTANCE_SEQ, REF_SOP_UID = "00081115", "0008114A", "00081155"
SOURCE_IMAGE_SEQ, REF_IMAGE_SEQ = "00082112", "00081140"


@pytest.fixture
def orthanc(tmp_path_factory):
    """Base URL of a fresh Orthanc (child process, storage in a tmp dir); stopped at teardown."""
    if MISSING:
        pytest.skip(MISSING)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server.base
    finally:
        server.stop()
        assert_stopped(server)


def _request(url: str, data: bytes | None = None, content_type: str | None = None):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("Accept", "application/dicom+json, application/json")
    if content_type:
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
    return json.loads(body) if body else []


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


def _klip_med_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("klip-med")), "run", *args,
                           "--physics", "ct-sparse:views=60", "--prior", "ct-abdomen-128", "--samples", "1",
                           "--steps", "3", "--null", "none", "--no-progress"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _series_metadata(server: Orthanc, study: str) -> dict[str, list[dict]]:
    series = server.request(f"/dicom-web/studies/{study}/series")
    return {_first(s, SERIES_UID): server.request(f"/dicom-web/studies/{study}/series/{_first(s, SERIES_UID)}/metadata")
            for s in series}


def test_cli_pulls_a_series_and_pushes_the_outputs_back(tmp_path):
    """Pull with QIDO-RS + WADO-RS, run, push with STOW-RS; QIDO-RS then lists the new series in the source's
    study, SEG and PM referencing the source series. A refused push: one line, exit 2, local outputs intact."""
    if MISSING:
        pytest.skip(MISSING)
    password = "pacs-password-not-for-logs"
    pacs = start_orthanc(tmp_path / "pacs", users={"klip": password})
    refusing = start_orthanc(tmp_path / "refusing", lua='function IncomingHttpRequestFilter(method, uri, ip, user, '
                                                        'headers)\n  return method ~= "POST"\nend\n')
    try:
        pacs.upload(sorted(CT5N.iterdir()))
        source = read_dicom_series(CT5N)
        study, src_series = source.datasets[0].StudyInstanceUID, source.datasets[0].SeriesInstanceUID
        url = f"{pacs.dicomweb}/studies/{study}/series/{src_series}"
        out = tmp_path / "out"
        env = {"KLIP_PACS_AUTH": f"klip:{password}"}
        done = _klip_med_run("--input", url, "--push", pacs.dicomweb, "--auth", "basic:env:KLIP_PACS_AUTH",
                             "--out", str(out), env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        summary_text = (out / "summary.json").read_text()
        for text in (done.stdout, done.stderr, summary_text):
            assert password not in text
        summary = json.loads(summary_text)
        assert summary["input"]["path"] == url and summary["input"]["format"] == "dicomweb"
        assert summary["input"]["dicomweb"]["auth"] == "basic credential from env:KLIP_PACS_AUTH"
        assert summary["push"]["not_sent"] == [] and len(summary["push"]["sent"]) == 12

        metadata = _series_metadata(pacs, study)
        written = {name: pydicom.dcmread(out / "dicom" / name, stop_before_pixels=True)
                   for name in ("klip_pm.dcm", "klip_seg.dcm")}
        recon = read_dicom_series(out / "dicom" / "recon")
        assert set(metadata) == {src_series, recon.datasets[0].SeriesInstanceUID,
                                 *(ds.SeriesInstanceUID for ds in written.values()),
                                 pydicom.dcmread(next((out / "dicom" / "klip_sc").iterdir())).SeriesInstanceUID}
        for name, ds in written.items():  # SEG and PM: one multi-frame instance over the whole source series
            (inst,) = metadata[ds.SeriesInstanceUID]
            assert _first(inst, MODALITY) == ds.Modality == {"klip_pm.dcm": "OT", "klip_seg.dcm": "SEG"}[name]
            ref = inst[REF_SERIES_SEQ]["Value"]
            assert [_first(r, SERIES_UID) for r in ref] == [src_series], name
            assert _ref_sops(ref[0][REF_INSTANCE_SEQ]["Value"]) == set(source.sop_instance_uids), name
            assert int(_first(inst, "00280008")) == source.shape[0], name  # NumberOfFrames
        klip = np.asarray(nib.load(out / "klip.nii.gz").dataobj, dtype=np.float32).transpose(2, 1, 0)
        np.testing.assert_allclose(read_parametric_map(out / "dicom" / "klip_pm.dcm", source), klip, rtol=1e-5)
        seg, _ = read_seg(out / "dicom" / "klip_seg.dcm", source)
        assert int((seg > 0).sum()) == summary["threshold"]["source_pixels_flagged"] > 0

        before = {p: p.read_bytes() for p in (out / "dicom").rglob("*.dcm")}
        refused = _klip_med_run("--input", url, "--push", refusing.dicomweb, "--auth", "basic:env:KLIP_PACS_AUTH",
                                "--out", str(out), env=env)  # resumes: slices are cached; the push is refused
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("klip-med: error: --push: expected every DICOM object stored by "
                                                       f"{refusing.dicomweb}, found 12 of 12 files not sent"), lines
        assert "HTTP 403 Forbidden" in lines[0] and "local outputs in" in lines[0] and password not in lines[0]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["push"]["sent"] == [] and len(summary["push"]["not_sent"]) == 12
        for rel in summary["push"]["not_sent"]:
            assert (out / rel["file"]).is_file() and pydicom.dcmread(out / rel["file"]).SOPInstanceUID
        assert sorted(p.name for p in (out / "dicom").iterdir()) == sorted(
            {p.relative_to(out / "dicom").parts[0] for p in before})
    finally:
        for server in (pacs, refusing):
            server.stop()
            assert_stopped(server)
