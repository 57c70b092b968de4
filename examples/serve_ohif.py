"""Serve a prebuilt OHIF viewer (the ``dist/`` of the npm package ``@ohif/app``) on 127.0.0.1 with
one data source: a DICOMweb server (e.g. a local Orthanc) reached through this same origin.

    python examples/serve_ohif.py --dist .viewer/package/dist --dicomweb http://127.0.0.1:8042/dicom-web

What it does (standard library only):
- serves the files of ``--dist``; any other path gets ``index.html`` (OHIF's client-side routes);
- answers ``/app-config.js`` with a configuration whose one data source is ``/dicom-web`` here;
- forwards ``/dicom-web/...`` (GET and POST, headers and bodies) to ``--dicomweb``, so the browser
  sees one origin and the PACS needs no CORS settings.

It prints ``OHIF at http://127.0.0.1:PORT/`` once listening (and writes PORT to ``--port-file``),
then serves until interrupted. Open ``http://127.0.0.1:PORT/viewer?StudyInstanceUIDs=<uid>``.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

FORWARDED_REQUEST_HEADERS = ("Accept", "Content-Type", "Range")
FORWARDED_ANSWER_HEADERS = ("Content-Type", "Content-Range", "Accept-Ranges")


def app_config(origin: str) -> str:
    """OHIF's ``window.config``: one DICOMweb data source at ``origin/dicom-web``, no start-up dialogs."""
    root = f"{origin}/dicom-web"
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "local",
        "configuration": {
            "friendlyName": "local DICOMweb (klip_med review)",
            "name": "local",
            "wadoUriRoot": root,
            "qidoRoot": root,
            "wadoRoot": root,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "local",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


def make_handler(dist: Path, upstream: str):
    dist = dist.resolve()
    index = (dist / "index.html").read_bytes()
    upstream = upstream.rstrip("/")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet: one line per failed request only
            if args and str(args[1]).startswith(("4", "5")):
                sys.stderr.write("serve_ohif: %s\n" % (format % args))

        def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            path = self.path[len("/dicom-web"):]
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else None
            req = urllib.request.Request(upstream + path, data=data, method=self.command)
            for key in FORWARDED_REQUEST_HEADERS:
                if self.headers.get(key):
                    req.add_header(key, self.headers[key])
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    status, body, headers = resp.status, resp.read(), resp.headers
            except urllib.error.HTTPError as exc:
                status, body, headers = exc.code, exc.read(), exc.headers
            except (urllib.error.URLError, OSError) as exc:
                self._send(502, f"DICOMweb server unreachable: {exc}".encode(), "text/plain")
                return
            extra = {k: headers[k] for k in FORWARDED_ANSWER_HEADERS[1:] if headers.get(k)}
            self._send(status, body, headers.get("Content-Type", "application/octet-stream"), extra)

        def do_POST(self) -> None:
            if self.path.startswith("/dicom-web/"):
                self._proxy()
            else:
                self._send(405, b"", "text/plain")

        def do_GET(self) -> None:
            if self.path.startswith("/dicom-web/"):
                self._proxy()
                return
            path = urlsplit(self.path).path
            if path == "/app-config.js":
                host = self.headers.get("Host", f"127.0.0.1:{self.server.server_address[1]}")
                self._send(200, app_config(f"http://{host}").encode(), "application/javascript")
                return
            target = (dist / path.lstrip("/")).resolve()
            if target.is_file() and target.is_relative_to(dist):
                kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                if target.suffix == ".wasm":
                    kind = "application/wasm"
                self._send(200, target.read_bytes(), kind)
            else:
                self._send(200, index, "text/html")

        do_HEAD = do_GET

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", required=True, type=Path, help="the OHIF dist/ folder (npm @ohif/app)")
    parser.add_argument("--dicomweb", required=True, help="DICOMweb root to forward /dicom-web to")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--port-file", type=Path, help="write the port here once listening")
    args = parser.parse_args(argv)
    if not (args.dist / "index.html").is_file():
        parser.error(f"--dist: expected OHIF's dist/ folder with index.html, found {args.dist}")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.dist, args.dicomweb))
    server.daemon_threads = True
    port = server.server_address[1]
    if args.port_file:
        args.port_file.write_text(str(port))
    print(f"OHIF at http://127.0.0.1:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
