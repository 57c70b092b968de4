"""Talking to a PACS over DICOMweb: URLs, credentials, TLS, timeouts, retries and error messages.

Credentials are read from an environment variable or a file named by an *auth spec*, never given
as a value: ``bearer:env:VAR``, ``bearer:file:PATH`` (an OAuth / JWT token), ``basic:env:VAR``,
``basic:file:PATH`` (``user:password``). The secret is held in one object whose ``repr`` hides it;
every message built from a server's or a library's exception passes through :func:`redact`.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from klip_med.errors import KLIPMedError, expect

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5
RETRY_STATUSES = (408, 429, 502, 503, 504)
"""HTTP answers worth another try (after a back-off); anything else fails at once."""
AUTH_SPECS = ("bearer:env:VAR", "bearer:file:PATH", "basic:env:VAR", "basic:file:PATH")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_dicomweb_url(text: str | os.PathLike[str]) -> bool:
    """True for ``http://`` / ``https://`` addresses (a DICOMweb series or root)."""
    return isinstance(text, str) and text.lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class Credential:
    """A bearer token or a ``user:password`` pair, and where it was read from (``env:VAR`` /
    ``file:PATH``). ``repr`` / ``str`` never show the secret."""

    kind: str
    origin: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return f"{self.kind} credential from {self.origin}"

    def hidden_forms(self) -> list[str]:
        """Every spelling of the secret that could appear in a message (to redact)."""
        forms = [self.secret]
        if self.kind == "basic":
            forms.append(base64.b64encode(self.secret.encode()).decode())
            forms.append(self.secret.split(":", 1)[1])
        return [f for f in forms if f]

    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header."""
        if self.kind == "bearer":
            return {"Authorization": f"Bearer {self.secret}"}
        return {"Authorization": "Basic " + base64.b64encode(self.secret.encode()).decode()}


def read_credential(spec: str, argument: str = "--auth") -> Credential:
    """Read a credential named by ``bearer|basic:env:VAR`` or ``bearer|basic:file:PATH``.

    The spec names where the secret is; a spec that holds anything else is refused without
    echoing it (it may be the secret itself, pasted by mistake).
    """
    parts = spec.split(":", 2)
    ok = len(parts) == 3 and parts[0] in ("bearer", "basic") and parts[1] in ("env", "file") and parts[2]
    expect(bool(ok), argument, f"one of {', '.join(AUTH_SPECS)} (where the secret is, never the secret)",
           "a value of another form (not shown: it may be a secret)")
    kind, where, name = parts
    if where == "env":
        expect(name in os.environ and os.environ[name].strip() != "", argument,
               f"environment variable {name} holding the {kind} credential", "it unset or empty")
        secret = os.environ[name].strip()
    else:
        path = Path(name).expanduser()
        expect(path.is_file(), argument, f"a file holding the {kind} credential", f"no file {str(path)!r}")
        try:
            lines = path.read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise KLIPMedError(f"{argument}: expected a readable text file {str(path)!r}, found "
                               f"{type(exc).__name__}") from None
        secret = lines[0].strip() if lines else ""
        expect(secret != "", argument, f"the {kind} credential on the first line of {str(path)!r}",
               "an empty file")
    if kind == "basic":
        expect(":" in secret and secret.index(":") > 0, argument,
               f"'user:password' in {where} {name}", "no 'user:' part (value not shown)")
    expect(all(c.isprintable() and c not in "\r\n" for c in secret), argument,
           f"a credential of printable characters in {where} {name}", "control characters (value not shown)")
    return Credential(kind, f"{where}:{name}", secret)


@dataclass(frozen=True)
class DicomWebOptions:
    """How to reach the server.

    Attributes:
        credential: sent as the ``Authorization`` header (None: no authentication).
        ca_bundle: a PEM file of trusted CAs for ``https`` (None: the system's). TLS certificates
            are always verified.
        timeout_s: seconds to wait for a connection and for each read.
        retries: further tries of a request that failed to connect or got 408 / 429 / 502 / 503 / 504.
        backoff_s: first wait between tries; doubled each time.
    """

    credential: Credential | None = None
    ca_bundle: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S

    def __post_init__(self) -> None:
        expect(self.timeout_s > 0, "timeout", "a positive number of seconds", self.timeout_s)
        expect(isinstance(self.retries, int) and 0 <= self.retries <= 20, "retries", "an integer 0..20",
               self.retries)
        expect(self.backoff_s >= 0, "backoff", "a non-negative number of seconds", self.backoff_s)
        if self.ca_bundle is not None:
            expect(Path(self.ca_bundle).is_file(), "--ca-bundle", "a PEM file of trusted certificates",
                   f"no file {self.ca_bundle!r}")

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for ``summary.json``: where the credential came from, never the secret."""
        return {"auth": None if self.credential is None else str(self.credential),
                "ca_bundle": self.ca_bundle, "timeout_s": self.timeout_s, "retries": self.retries,
                "backoff_s": self.backoff_s}


def redact(text: str, options: DicomWebOptions | None) -> str:
    """``text`` with every form of the credential replaced by ``***``."""
    if options is not None and options.credential is not None:
        for form in options.credential.hidden_forms():
            text = text.replace(form, "***")
    return text


@dataclass(frozen=True)
class SeriesURL:
    """``ROOT/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>`` taken apart."""

    root: str
    study_uid: str
    series_uid: str

    def __str__(self) -> str:
        return f"{self.root}/studies/{self.study_uid}/series/{self.series_uid}"


def _check_address(url: str, argument: str, form: str) -> tuple[str, str]:
    expect(is_dicomweb_url(url), argument, form, repr(url))
    parts = urlsplit(url)
    expect(parts.username is None and parts.password is None, argument,
           f"{form} without user or password in it (use --auth basic:env:VAR)",
           "credentials in the URL (not shown)")
    expect(bool(parts.hostname), argument, form, f"no host in {url!r}")
    expect(not parts.query and not parts.fragment, argument, f"{form} without '?' or '#' parts", repr(url))
    try:
        _ = parts.port
    except ValueError:
        raise KLIPMedError(f"{argument}: expected {form}, found a bad port in {url!r}") from None
    return f"{parts.scheme.lower()}://{parts.netloc}", parts.path.rstrip("/")


def parse_series_url(url: str, argument: str = "--input") -> SeriesURL:
    """Split a DICOMweb series address into its root and UIDs (checked)."""
    form = "a DICOMweb series URL http(s)://HOST[:PORT]/ROOT/studies/<StudyUID>/series/<SeriesUID>"
    origin, path = _check_address(url, argument, form)
    match = re.fullmatch(r"(.*)/studies/([^/]+)/series/([^/]+)", path)
    expect(match is not None, argument, form, repr(url))
    assert match is not None
    prefix, study, series = match.groups()
    for name, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        expect(bool(_UID.match(uid)) and len(uid) <= 64, f"{argument}: {name}",
               "a DICOM UID (digits and dots, at most 64 characters)", repr(uid))
    return SeriesURL(origin + prefix, study, series)


def parse_root_url(url: str, argument: str = "--push") -> str:
    """A DICOMweb root (the part before ``/studies``), checked, without a trailing slash."""
    form = "a DICOMweb root URL http(s)://HOST[:PORT]/ROOT (e.g. .../dicom-web)"
    origin, path = _check_address(url, argument, form)
    expect(re.search(r"/studies(/|$)", path) is None, argument, f"{form}: the part before /studies", repr(url))
    return origin + path


def warn_plain_http(url: str, options: DicomWebOptions, argument: str) -> None:
    """One stderr line when a credential would cross the network unencrypted (http to another host)."""
    parts = urlsplit(url)
    if options.credential is None or parts.scheme.lower() == "https":
        return
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        print(f"klip-med: warning: {argument} {url} is plain http: the {options.credential.kind} credential "
              "crosses the network unencrypted (use https)", file=sys.stderr)


def open_client(root: str, options: DicomWebOptions):
    """A ``dicomweb_client.DICOMwebClient`` on ``root``: the credential, verified TLS (with
    ``ca_bundle``), connection / read timeouts and retries with exponential back-off."""
    import requests
    from dicomweb_client.api import DICOMwebClient
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    session.trust_env = False  # no .netrc credentials or CA settings picked up behind the user's back ...
    session.proxies.update(requests.utils.get_environ_proxies(root))  # ... but HTTP(S)_PROXY / NO_PROXY hold
    session.verify = options.ca_bundle or True
    if options.credential is not None:
        session.headers.update(options.credential.headers())
    retry = Retry(total=options.retries, connect=options.retries, read=0, status=options.retries,
                  backoff_factor=options.backoff_s, status_forcelist=RETRY_STATUSES,
                  allowed_methods=frozenset({"GET", "POST"}), raise_on_status=False,
                  respect_retry_after_header=True)
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    client = DICOMwebClient(root, session=session, timeout=options.timeout_s, chunk_size=1 << 31)
    client.set_http_retry_params(retry=False)  # one retry mechanism: the session's
    return client


def _http_reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response is None:
        return ""
    return f"HTTP {response.status_code} {response.reason or ''}".strip()


def _is_read_timeout(exc: BaseException) -> bool:
    """requests reports a read timeout that exhausted the retries as a ConnectionError."""
    from urllib3.exceptions import ReadTimeoutError

    reason = getattr(exc.args[0], "reason", None) if getattr(exc, "args", None) else None
    return isinstance(reason, ReadTimeoutError) or isinstance(exc.__context__, ReadTimeoutError)


def describe_failure(exc: BaseException, url: str, options: DicomWebOptions) -> str:
    """What went wrong talking to ``url``, in words a user can act on (credential redacted)."""
    import requests

    reason = _http_reason(exc) if isinstance(exc, Exception) else ""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        hint = ("credentials the server accepts (--auth bearer|basic:env:VAR or :file:PATH)"
                if options.credential is None else f"credentials the server accepts ({options.credential})")
        text = f"expected {hint}, found {reason} from {url}"
    elif status == 404:
        text = f"expected the resource to exist on the server, found {reason} for {url}"
    elif status is not None:
        text = f"expected a successful answer from {url}, found {reason}"
    elif isinstance(exc, requests.exceptions.SSLError):
        text = (f"expected a TLS certificate that verifies (trust a private CA with --ca-bundle), found "
                f"SSL error talking to {url}")
    elif isinstance(exc, requests.exceptions.Timeout) or _is_read_timeout(exc):
        text = f"expected an answer from {url} within {options.timeout_s:g} s, found none (timeout)"
    elif isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        text = (f"expected a DICOMweb server answering at {url}, found the connection refused or lost "
                f"({type(exc).__name__}, after {options.retries} {'retry' if options.retries == 1 else 'retries'})")
    else:
        text = f"expected a DICOMweb answer from {url}, found {type(exc).__name__}: {exc}"
    return redact(text, options)


@contextlib.contextmanager
def failures_as_errors(argument: str, url: str, options: DicomWebOptions, context: str = "") -> Iterator[None]:
    """Turn network / HTTP / decoding failures inside the block into one :class:`KLIPMedError` line."""
    import requests
    from pydicom.errors import InvalidDicomError

    try:
        yield
    except KLIPMedError:
        raise
    except (requests.exceptions.RequestException, OSError, ValueError, InvalidDicomError) as exc:
        where = f" ({context})" if context else ""
        raise KLIPMedError(f"{argument}: {describe_failure(exc, url, options)}{where}") from None
