"""A throwaway Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) for tests: a child process on
127.0.0.1 with its storage in a temporary folder, stopped (and checked gone) by the caller.

Used by tests/test_io_orthanc.py, tests/test_io_dicomweb.py and tests/test_viewer_ohif.py.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

APT = "apt-get install -y orthanc orthanc-dicomweb"
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
DICOMWEB_PLUGIN = next(
    (p for p in (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                 *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))) if p.exists()),
    None,
)
MISSING = None if ORTHANC and DICOMWEB_PLUGIN else f"Orthanc or its DICOMweb plugin not installed ({APT})"
"""Why Orthanc tests cannot run here (None when they can)."""


def free_port() -> int:
    # Orthanc's HTTP server listens on every interface (access from other hosts is refused by
    # RemoteAccessAllowed=false), so the port must be free on all of them.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc: ``base`` (REST), ``dicomweb`` (DICOMweb root), the process and its folder."""

    base: str
    proc: subprocess.Popen
    root: Path
    users: dict[str, str]

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    @property
    def log(self) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def request(self, path: str, data: bytes | None = None, content_type: str | None = None,
                accept: str = "application/dicom+json, application/json"):
        req = urllib.request.Request(self.base + path, data=data, method="POST" if data is not None else "GET")
        req.add_header("Accept", accept)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body else []

    def upload(self, files) -> None:
        for f in files:
            reply = self.request("/instances", Path(f).read_bytes(), "application/dicom")
            assert reply["Status"] in ("Success", "AlreadyStored"), (str(f), reply)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def kill(self) -> None:
        """Die at once (SIGKILL), as a crashed server would."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_orthanc(root: Path, *, users: dict[str, str] | None = None, lua: str | None = None,
                  timeout_s: float = 60.0) -> Orthanc:
    """Start Orthanc with its storage and config in ``root`` (HTTP on 127.0.0.1, DICOMweb on).

    Args:
        users: HTTP basic-auth users (enables authentication); None: open.
        lua: a Lua script (e.g. a ``ReceivedInstanceFilter`` that refuses instances).
    """
    assert MISSING is None, MISSING
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "klip_med_test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpServerEnabled": True,
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "SaveJobs": False,
        "HttpDescribeErrors": True,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    if lua is not None:
        (root / "filter.lua").write_text(lua)
        config["LuaScripts"] = [str(root / "filter.lua")]
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    with open(root / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=root)
    server = Orthanc(f"http://127.0.0.1:{port}", proc, root, dict(users or {}))
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{server.log}")
            try:
                plugins = server.request("/plugins")
                if "dicom-web" in plugins:
                    return server
                raise RuntimeError(f"DICOMweb plugin not loaded (plugins: {plugins}):\n{server.log}")
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer on {server.base}:\n{server.log}")
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise


def assert_stopped(server: Orthanc) -> None:
    """The process is gone and no other Orthanc runs on this config."""
    assert server.proc.poll() is not None, "Orthanc still running after teardown"
    left = subprocess.run(["pgrep", "-f", str(server.root / "orthanc.json")], capture_output=True,
                          text=True).stdout
    assert left.strip() == "", f"Orthanc processes left: {left}"
