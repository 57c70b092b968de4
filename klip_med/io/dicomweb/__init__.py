"""DICOMweb in and out with ``dicomweb-client``: a series from a PACS (QIDO-RS, WADO-RS) and the
output set back to it (STOW-RS).

- :func:`read_series` -- a series URL ``http(s)://HOST/ROOT/studies/<StudyUID>/series/<SeriesUID>``
  to a :class:`~klip_med.io.volume.Volume`, with the checks of a DICOM folder;
  :func:`retrieve_series` keeps the files (written whole or not at all); :func:`list_instances`.
- :func:`push_files` / :func:`push_output_set` -- STOW-RS to ``http(s)://HOST/ROOT``; a
  :class:`PushReport` lists what the server confirmed and what was not sent.
- :class:`DicomWebOptions` -- credential (:func:`read_credential`: ``bearer|basic:env:VAR`` or
  ``:file:PATH``; never a value), CA bundle (TLS is always verified), timeout, retries with
  exponential back-off.

Failures (wrong URL, 401 / 403, 404, refused or lost connection, TLS, timeout) raise one
:class:`~klip_med.errors.KLIPMedError` line naming the URL, what was expected and what was
found; the credential never appears in a message, a ``repr`` or a summary.
"""

from klip_med.io.dicomweb.connection import (
    AUTH_SPECS,
    Credential,
    DicomWebOptions,
    SeriesURL,
    is_dicomweb_url,
    parse_root_url,
    parse_series_url,
    read_credential,
    redact,
    warn_plain_http,
)
from klip_med.io.dicomweb.transfer import (
    PushReport,
    list_instances,
    output_set_files,
    push_files,
    push_output_set,
    read_series,
    retrieve_series,
)

__all__ = [
    "AUTH_SPECS",
    "Credential",
    "DicomWebOptions",
    "PushReport",
    "SeriesURL",
    "is_dicomweb_url",
    "list_instances",
    "output_set_files",
    "parse_root_url",
    "parse_series_url",
    "push_files",
    "push_output_set",
    "read_credential",
    "read_series",
    "redact",
    "retrieve_series",
    "warn_plain_http",
]
