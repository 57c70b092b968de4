# Needs: apt-get install -y orthanc orthanc-dicomweb   (else the server tests skip, saying so)
"""klip_med.io.dicomweb against a real Orthanc on 127.0.0.1 (no mock of the HTTP layer): a series
pulled over QIDO-RS / WADO-RS equals the folder it came from; outputs pushed with STOW-RS are listed
by QIDO-RS; and each fault -- a malformed URL, nothing listening, a wrong path, a 401, an unknown
series, a server killed mid-retrieve, a push the server refuses, a slow or overloaded server -- is
one KLIPMedError line (or a PushReport naming what was not sent), leaves nothing half written and
never shows the credential. Bearer tokens, 503 retries and timeouts go through a small gate (a real
HTTP server in a thread) in front of the same Orthanc."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_server import MISSING, assert_stopped, free_port, start_orthanc

from klip_med.errors import KLIPMedError
from klip_med.io import read_dicom_series, write_parametric_map
from klip_med.io.dicomweb import (
    DicomWebOptions,
    list_instances,
    parse_root_url,
    parse_series_url,
    push_files,
    read_credential,
    read_series,
    retrieve_series,
)

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
FAST = DicomWebOptions(timeout_s=10, retries=1, backoff_s=0.05)
SECRET = "s3cr3t-T0ken-do-not-print"
needs_orthanc = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def _series_url(root: str) -> str:
    ds = pydicom.dcmread(next(CT5N.iterdir()), stop_before_pixels=True)
    return f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """An open Orthanc holding the CT5N series."""
    if MISSING:
        pytest.skip(MISSING)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        server.upload(sorted(CT5N.iterdir()))
        yield server
    finally:
        server.stop()
        assert_stopped(server)


class Gate:
    """A real HTTP server in front of Orthanc: checks a bearer token, can answer 503 ``fail`` times
    first, or wait ``delay_s`` before answering."""

    def __init__(self, upstream: str, token: str | None = None, fail: int = 0, delay_s: float = 0.0):
        gate = self
        self.upstream, self.token, self.fail, self.delay_s, self.seen = upstream, token, fail, delay_s, 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                try:
                    self._forward()
                except (OSError, urllib.error.URLError):  # the client gave up, or the test ended: drop it
                    pass

            def _forward(self):
                gate.seen += 1
                if gate.delay_s:
                    threading.Event().wait(gate.delay_s)
                if gate.fail > 0:
                    gate.fail -= 1
                    return self._send(503, b"busy")
                if gate.token is not None and self.headers.get("Authorization") != f"Bearer {gate.token}":
                    return self._send(401, b"unauthorized")
                length = int(self.headers.get("Content-Length") or 0)
                req = urllib.request.Request(gate.upstream + self.path, method=self.command,
                                             data=self.rfile.read(length) if length else None)
                for key in ("Accept", "Content-Type"):
                    if self.headers.get(key):
                        req.add_header(key, self.headers[key])
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        self._send(resp.status, resp.read(), resp.headers.get("Content-Type"))
                except urllib.error.HTTPError as exc:
                    self._send(exc.code, exc.read(), exc.headers.get("Content-Type"))

            def _send(self, status, body, content_type=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type or "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


# --- no server needed -------------------------------------------------------------------------


def test_urls_are_checked():
    series = parse_series_url("https://pacs.example.org/dicom-web/studies/1.2.3/series/4.5.6/")
    assert (series.root, series.study_uid, series.series_uid) == ("https://pacs.example.org/dicom-web",
                                                                  "1.2.3", "4.5.6")
    assert parse_root_url("http://127.0.0.1:8042/dicom-web/") == "http://127.0.0.1:8042/dicom-web"
    with pytest.raises(KLIPMedError, match=r"--input: expected a DICOMweb series URL .*/studies/<StudyUID>"):
        parse_series_url("http://pacs/dicom-web/studies/1.2.3")
    with pytest.raises(KLIPMedError, match=r"StudyInstanceUID: expected a DICOM UID"):
        parse_series_url("http://pacs/dicom-web/studies/abc/series/1.2")
    with pytest.raises(KLIPMedError, match=r"--push: expected .* the part before /studies"):
        parse_root_url("http://pacs/dicom-web/studies/1.2")
    with pytest.raises(KLIPMedError) as err:  # credentials in a URL land in shell history: refused, not shown
        parse_series_url(f"https://user:{SECRET}@pacs/dicom-web/studies/1.2/series/1.3")
    assert SECRET not in str(err.value) and "--auth basic:env:VAR" in str(err.value)


def test_credentials_come_from_env_or_file_and_never_show(tmp_path, monkeypatch):
    monkeypatch.setenv("KLIP_TEST_TOKEN", SECRET)
    cred = read_credential("bearer:env:KLIP_TEST_TOKEN")
    assert cred.headers() == {"Authorization": f"Bearer {SECRET}"}
    for text in (repr(cred), str(cred), repr(DicomWebOptions(credential=cred)),
                 str(DicomWebOptions(credential=cred).describe())):
        assert SECRET not in text
    (tmp_path / "basic").write_text(f"klip:{SECRET}\n")
    basic = read_credential(f"basic:file:{tmp_path / 'basic'}")
    assert basic.kind == "basic" and SECRET not in repr(basic)
    with pytest.raises(KLIPMedError) as err:  # the secret pasted as the spec: refused without echo
        read_credential(f"bearer:{SECRET}")
    assert SECRET not in str(err.value)
    with pytest.raises(KLIPMedError, match=r"environment variable KLIP_UNSET_VAR .* found it unset"):
        read_credential("bearer:env:KLIP_UNSET_VAR")
    (tmp_path / "nouser").write_text(SECRET)
    with pytest.raises(KLIPMedError) as err:
        read_credential(f"basic:file:{tmp_path / 'nouser'}")
    assert "'user:password'" in str(err.value) and SECRET not in str(err.value)
    with pytest.raises(KLIPMedError, match=r"--ca-bundle: expected a PEM file"):
        DicomWebOptions(ca_bundle=str(tmp_path / "missing.pem"))


def test_nothing_listening_is_one_clear_line(tmp_path):
    url = _series_url(f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(KLIPMedError, match=r"^--input: expected a DICOMweb server answering at http://127\.0\.0\.1:"
                                          r".*connection refused or lost.*\(listing the instances with QIDO-RS\)$"):
        read_series(url, DicomWebOptions(retries=1, backoff_s=0.01))


# --- against Orthanc --------------------------------------------------------------------------


@needs_orthanc
def test_series_from_pacs_equals_the_folder(pacs, tmp_path):
    url = _series_url(pacs.dicomweb)
    remote = read_series(url, FAST)
    local = read_dicom_series(CT5N)
    assert remote.source == url and remote.sop_instance_uids == local.sop_instance_uids
    np.testing.assert_array_equal(remote.pixels, local.pixels)
    np.testing.assert_allclose(remote.affine, local.affine)
    files = retrieve_series(url, tmp_path / "kept", FAST)
    assert sorted(p.name for p in files) == sorted(f"{u}.dcm" for u in local.sop_instance_uids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no temporary folder left


@needs_orthanc
def test_push_then_qido_lists_the_new_series(pacs, tmp_path):
    vol = read_dicom_series(CT5N)
    pm = write_parametric_map(vol, np.random.default_rng(0).random(vol.shape).astype(np.float32),
                              tmp_path / "klip_pm.dcm")
    before = pm.read_bytes()
    report = push_files(pacs.dicomweb, [pm], FAST, base=tmp_path)
    assert report.ok and report.sent == ("klip_pm.dcm",)
    ds = pydicom.dcmread(pm, stop_before_pixels=True)
    root = f"{pacs.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    assert list_instances(root, FAST) == [ds.SOPInstanceUID]
    assert pm.read_bytes() == before


@needs_orthanc
def test_wrong_path_and_unknown_series(pacs):
    with pytest.raises(KLIPMedError, match=r"found HTTP 404 Not Found for http://127\.0\.0\.1:\d+/wrong/studies/"):
        read_series(_series_url(f"{pacs.base}/wrong"), FAST)
    with pytest.raises(KLIPMedError, match=r"--input: expected a series with instances on the server .* found QIDO-RS "
                                          r"lists no instance of series 1\.2\.3\.4 in study 1\.2\.3"):
        read_series(f"{pacs.dicomweb}/studies/1.2.3/series/1.2.3.4", FAST)


@needs_orthanc
def test_401_names_the_credential_never_its_value(tmp_path, monkeypatch):
    server = start_orthanc(tmp_path / "orthanc", users={"klip": "right-password"})
    try:
        server.upload(sorted(CT5N.iterdir()))
        url = _series_url(server.dicomweb)
        with pytest.raises(KLIPMedError, match=r"expected credentials the server accepts \(--auth .*found HTTP 401"):
            read_series(url, FAST)
        monkeypatch.setenv("KLIP_TEST_BASIC", f"klip:{SECRET}")
        wrong = DicomWebOptions(credential=read_credential("basic:env:KLIP_TEST_BASIC"), retries=0)
        with pytest.raises(KLIPMedError, match=r"basic credential from env:KLIP_TEST_BASIC.*HTTP 401") as err:
            read_series(url, wrong)
        assert SECRET not in str(err.value)
        monkeypatch.setenv("KLIP_TEST_BASIC", "klip:right-password")
        right = DicomWebOptions(credential=read_credential("basic:env:KLIP_TEST_BASIC"), retries=0)
        assert read_series(url, right).shape == (5, 16, 16)
    finally:
        server.stop()
        assert_stopped(server)


@needs_orthanc
def test_bearer_token_retries_and_timeout(pacs, monkeypatch):
    monkeypatch.setenv("KLIP_TEST_TOKEN", SECRET)
    token = DicomWebOptions(credential=read_credential("bearer:env:KLIP_TEST_TOKEN"), retries=0)
    with Gate(pacs.base, token=SECRET) as gate:
        url = _series_url(f"{gate.url}/dicom-web")
        assert read_series(url, token).shape == (5, 16, 16)
        with pytest.raises(KLIPMedError, match=r"HTTP 401"):
            read_series(url, DicomWebOptions(retries=0))
    with Gate(pacs.base, fail=2) as gate:  # overloaded twice, then fine: back-off and retry
        assert read_series(_series_url(f"{gate.url}/dicom-web"), DicomWebOptions(retries=3, backoff_s=0.01))
        assert gate.seen >= 3
    with Gate(pacs.base, fail=5) as gate, pytest.raises(KLIPMedError, match=r"found HTTP 503"):
        read_series(_series_url(f"{gate.url}/dicom-web"), DicomWebOptions(retries=1, backoff_s=0.01))
    with Gate(pacs.base, delay_s=1.5) as gate, pytest.raises(KLIPMedError, match=r"within 0\.3 s, found none"):
        read_series(_series_url(f"{gate.url}/dicom-web"), DicomWebOptions(timeout_s=0.3, retries=0))


@needs_orthanc
def test_server_dying_mid_retrieve_leaves_nothing(tmp_path):
    server = start_orthanc(tmp_path / "orthanc")
    try:
        server.upload(sorted(CT5N.iterdir()))
        keep = tmp_path / "kept"
        keep.mkdir()
        (keep / "earlier.dcm").write_bytes(b"an earlier complete copy")
        with pytest.raises(KLIPMedError, match=r"^--input: expected a DICOMweb server answering .*connection refused or "
                                              r"lost.*\(retrieving instance 3 of 5 with WADO-RS; nothing was kept\)$"):
            retrieve_series(_series_url(server.dicomweb), keep, DicomWebOptions(retries=1, backoff_s=0.01),
                            after_instance=lambda i: server.kill() if i == 1 else None)
        assert [p.name for p in keep.iterdir()] == ["earlier.dcm"]  # the old folder untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "orthanc"]  # no partial folder
    finally:
        server.stop()
        assert_stopped(server)


@needs_orthanc
@pytest.mark.parametrize("policy", ["drops_parametric_maps", "forbids_writes"])
def test_push_refused_by_the_server_is_reported_per_file(tmp_path, policy):
    lua = {  # an Orthanc that accepts STOW-RS but drops Parametric Maps; one that refuses every POST (403)
        "drops_parametric_maps": 'function ReceivedInstanceFilter(dicom, origin, info)\n'
                                 '  return dicom.SOPClassUID ~= "1.2.840.10008.5.1.4.1.1.30"\nend\n',
        "forbids_writes": 'function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n'
                          '  return method ~= "POST"\nend\n',
    }[policy]
    server = start_orthanc(tmp_path / "orthanc", lua=lua)
    try:
        vol = read_dicom_series(CT5N)
        out = tmp_path / "out"
        out.mkdir()
        pm = write_parametric_map(vol, np.ones(vol.shape, np.float32), out / "klip_pm.dcm")
        before = pm.read_bytes()
        report = push_files(server.dicomweb, [*sorted(CT5N.iterdir()), pm], FAST)
        if policy == "drops_parametric_maps":
            assert len(report.sent) == 5 and [f for f, _ in report.failed] == [str(pm)]
            assert "not listed by QIDO-RS afterwards" in report.failed[0][1]
            assert "1 of 6 files not sent" in report.error_line()
        else:
            assert report.sent == () and len(report.failed) == 6
            assert "HTTP 403 Forbidden" in report.failed[0][1] and "6 of 6 files not sent" in report.error_line()
        assert report.error_line().startswith(f"--push: expected every DICOM object stored by {server.dicomweb}, ")
        assert pm.read_bytes() == before  # the local output stays as written
        with pytest.raises(KLIPMedError, match=r"--push: expected existing DICOM files to send, found no file"):
            push_files(server.dicomweb, [out / "missing.dcm"], FAST)
    finally:
        server.stop()
        assert_stopped(server)
