"""Series in (QIDO-RS list, WADO-RS retrieve) and objects out (STOW-RS) with dicomweb-client.

Retrieval writes into a temporary folder and swaps it in whole (or reads it and deletes it): a
server that fails half way leaves nothing behind. A push happens after the local files are
complete and never touches them; its :class:`PushReport` says what the server confirmed and
what was not sent, and why.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom

from klip_med.errors import KLIPMedError, expect
from klip_med.io.dicom.output_set import write_series_folder
from klip_med.io.dicom.read import read_dicom_series
from klip_med.io.dicomweb.connection import (
    DicomWebOptions,
    SeriesURL,
    describe_failure,
    failures_as_errors,
    open_client,
    parse_root_url,
    parse_series_url,
)
from klip_med.io.volume import Volume

SOP_INSTANCE_UID = "00080018"
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
"""Ask for the instances as stored (compressed ones are decoded locally, as for a folder)."""
OUTPUT_KEYS = ("recon_series", "parametric_map", "seg", "secondary_capture")
"""The DICOM objects of an output set (``summary.json`` ``outputs``), in push order."""
BATCH_BYTES = 32 << 20
"""STOW-RS requests carry at most this many bytes of files (one file may exceed it alone)."""


def _options(options: DicomWebOptions | None) -> DicomWebOptions:
    return DicomWebOptions() if options is None else options


def _series(url: str | SeriesURL, argument: str) -> SeriesURL:
    return url if isinstance(url, SeriesURL) else parse_series_url(url, argument)


def list_instances(url: str | SeriesURL, options: DicomWebOptions | None = None, *,
                   argument: str = "--input") -> list[str]:
    """SOPInstanceUIDs of a series (QIDO-RS), in the server's order; raise when there is none."""
    series, options = _series(url, argument), _options(options)
    client = open_client(series.root, options)
    with failures_as_errors(argument, str(series), options, "listing the instances with QIDO-RS"):
        found = client.search_for_instances(series.study_uid, series.series_uid, fields=[SOP_INSTANCE_UID],
                                            get_remaining=True)
    uids = list(dict.fromkeys(str(item[SOP_INSTANCE_UID]["Value"][0]) for item in found
                              if item.get(SOP_INSTANCE_UID, {}).get("Value")))
    expect(bool(uids), argument, f"a series with instances on the server at {series.root}",
           f"QIDO-RS lists no instance of series {series.series_uid} in study {series.study_uid}")
    return uids


def retrieve_series(url: str | SeriesURL, folder: str | os.PathLike[str],
                    options: DicomWebOptions | None = None, *, argument: str = "--input",
                    after_instance: Callable[[int], None] | None = None) -> list[Path]:
    """Download every instance of a series into ``folder`` (``<SOPInstanceUID>.dcm``).

    The files land in a temporary folder next to ``folder`` that replaces it only once every
    instance has arrived and matches the request; on any failure nothing is left.

    Args:
        url: ``http(s)://HOST/ROOT/studies/<StudyUID>/series/<SeriesUID>``.
        folder: where the series goes (replaced as a whole when it exists).
        options: credential, TLS, timeouts, retries.
        argument: the name used in error messages (``--input`` for the CLI).
        after_instance: called with the index of each instance once it is retrieved.

    Returns:
        The written paths, in the order QIDO-RS listed the instances.
    """
    series, options = _series(url, argument), _options(options)
    uids = list_instances(series, options, argument=argument)
    client = open_client(series.root, options)
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)

    def download(tmp: Path) -> list[Path]:
        tmp.mkdir(parents=True)
        paths = []
        for i, uid in enumerate(uids):
            context = f"retrieving instance {i + 1} of {len(uids)} with WADO-RS; nothing was kept"
            with failures_as_errors(argument, str(series), options, context):
                ds = client.retrieve_instance(series.study_uid, series.series_uid, uid,
                                              media_types=ANY_TRANSFER_SYNTAX)
                got = (str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", "")))
                expect(got == (series.series_uid, uid), argument,
                       f"instance {uid} of series {series.series_uid}", f"series {got[0]!r}, instance {got[1]!r}")
                path = tmp / f"{uid}.dcm"
                ds.save_as(path, enforce_file_format=True)
            paths.append(path)
            if after_instance is not None:
                after_instance(i)
        return paths

    names = write_series_folder(target.parent, target.name, download)
    return [target / Path(n).name for n in names]


def read_series(url: str | SeriesURL, options: DicomWebOptions | None = None, *,
                argument: str = "--input") -> Volume:
    """Retrieve a series and read it with the checks of a DICOM folder
    (:func:`klip_med.io.read_dicom_series`); the downloaded files are deleted afterwards.

    Returns:
        The volume (its ``source`` is the series URL; its datasets hold headers only).
    """
    series = _series(url, argument)
    with tempfile.TemporaryDirectory(prefix="klip_med_dicomweb.") as tmp:
        retrieve_series(series, Path(tmp) / "series", options, argument=argument)
        try:
            volume = read_dicom_series(Path(tmp) / "series", derive_missing_uids=True)
        except KLIPMedError as exc:
            raise KLIPMedError(f"{argument} {series}: {str(exc).replace(tmp + os.sep, '')}") from None
    return replace(volume, source=str(series))


@dataclass(frozen=True)
class PushReport:
    """What a STOW-RS push did: files the server confirmed, and files not sent with the reason."""

    root: str
    sent: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.root, "sent": list(self.sent),
                "not_sent": [{"file": f, "reason": r} for f, r in self.failed]}

    def error_line(self, argument: str = "--push") -> str:
        """One line: how many files were not sent, which, and the first reason."""
        names = ", ".join(f for f, _ in self.failed[:4]) + (" ..." if len(self.failed) > 4 else "")
        return (f"{argument}: expected every DICOM object stored by {self.root}, found {len(self.failed)} of "
                f"{len(self.failed) + len(self.sent)} files not sent ({names}): {self.failed[0][1]}")


def _batches(files: Sequence[tuple[str, Path]], limit: int) -> list[list[tuple[str, Path]]]:
    out: list[list[tuple[str, Path]]] = []
    size = limit
    for item in files:
        n = item[1].stat().st_size
        if size + n > limit:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


def _stow_answer(answer, batch: list[tuple[str, str, Path]]
                 ) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Split a batch by the STOW-RS answer: stored (ReferencedSOPSequence), refused (FailedSOPSequence)
    and not mentioned (some servers answer with an empty body)."""
    stored = {str(it.get("ReferencedSOPInstanceUID", "")) for it in answer.get("ReferencedSOPSequence", [])}
    refused = {str(it.get("ReferencedSOPInstanceUID", "")): int(it.get("FailureReason", 0) or 0)
               for it in answer.get("FailedSOPSequence", [])}
    sent, failed, unknown = [], [], []
    for label, uid, _ in batch:
        if uid in refused:
            failed.append((label, f"refused by the server (STOW-RS failure reason 0x{refused[uid]:04X})"))
        elif uid in stored:
            sent.append(label)
        else:
            unknown.append(label)
    return sent, failed, unknown


def _verify_listed(client, root: str, sent: list[tuple[str, str, str, str]], options: DicomWebOptions
                   ) -> tuple[list[str], list[tuple[str, str]]]:
    """Check with QIDO-RS that the instances STOW-RS accepted are on the server (some servers accept,
    then drop an instance, e.g. an Orthanc filter)."""
    listed: dict[tuple[str, str], set[str]] = {}
    ok, missing = [], []
    for label, study, series, uid in sent:
        if (study, series) not in listed:
            try:
                found = client.search_for_instances(study, series, fields=[SOP_INSTANCE_UID], get_remaining=True)
                listed[(study, series)] = {str(it[SOP_INSTANCE_UID]["Value"][0]) for it in found
                                           if it.get(SOP_INSTANCE_UID, {}).get("Value")}
            except Exception as exc:
                reason = describe_failure(exc, root, options)
                return ok, missing + [(lb, f"accepted by STOW-RS, not confirmed by QIDO-RS: {reason}")
                                      for lb, *_ in sent[len(ok) + len(missing):]]
        if uid in listed[(study, series)]:
            ok.append(label)
        else:
            missing.append((label, "accepted by STOW-RS but not listed by QIDO-RS afterwards (the server dropped it)"))
    return ok, missing


def push_files(url: str, files: Sequence[str | os.PathLike[str]], options: DicomWebOptions | None = None,
               *, argument: str = "--push", base: str | os.PathLike[str] | None = None,
               verify: bool = True) -> PushReport:
    """Store DICOM files on a server with STOW-RS (``POST ROOT/studies``); the files are only read.

    Args:
        url: the DICOMweb root, e.g. ``https://pacs.example.org/dicom-web``.
        files: DICOM Part 10 files.
        base: files are named relative to this folder in the report (default: as given).
        verify: after STOW-RS, check with QIDO-RS that every accepted instance is listed.

    Returns:
        A :class:`PushReport`. Server refusals and network failures do not raise: the report
        lists each file not sent with the reason (after the first failed request the rest are
        not attempted). Unreadable local files raise :class:`KLIPMedError` before anything is sent.
    """
    root, options = parse_root_url(url, argument), _options(options)
    named: list[tuple[str, Path]] = []
    for f in files:
        path = Path(f)
        expect(path.is_file(), argument, "existing DICOM files to send", f"no file {str(path)!r}")
        named.append((str(path.relative_to(base)) if base is not None else str(path), path))
    client = open_client(root, options)
    sent: list[str] = []
    failed: list[tuple[str, str]] = []
    stop_reason = None
    uids: dict[str, tuple[str, str, str]] = {}
    for chunk in _batches(named, BATCH_BYTES):
        if stop_reason is not None:
            failed += [(label, f"not attempted: {stop_reason}") for label, _ in chunk]
            continue
        datasets, batch = [], []
        for label, path in chunk:
            try:
                ds = pydicom.dcmread(path)
            except Exception as exc:
                raise KLIPMedError(f"{argument}: expected a readable DICOM file {path}, found "
                                   f"{type(exc).__name__}: {exc}") from None
            datasets.append(ds)
            batch.append((label, str(ds.SOPInstanceUID), path))
            uids[label] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        try:
            answer = client.store_instances(datasets)
        except Exception as exc:  # network, HTTP status, malformed answer: nothing of this batch confirmed
            stop_reason = describe_failure(exc, f"{root}/studies", options)
            failed += [(label, stop_reason) for label, _, _ in batch]
            continue
        ok, bad, unknown = _stow_answer(answer, batch)
        sent += ok + (unknown if verify else [])  # QIDO-RS decides about the ones the answer left out
        failed += bad + ([] if verify else [(label, "not confirmed by the server's STOW-RS answer")
                                            for label in unknown])
    if verify and sent:
        sent, dropped = _verify_listed(client, root, [(label, *uids[label]) for label in sent], options)
        failed += dropped
    return PushReport(root, tuple(sent), tuple(failed))


def output_set_files(out: str | os.PathLike[str], outputs: Mapping[str, Any]) -> list[Path]:
    """The DICOM files of an output set (``summary.json`` ``outputs``): derived series, Parametric
    Map, SEG and Secondary Capture(s), in that order; the demo's source image is not included."""
    files: list[Path] = []
    for key in OUTPUT_KEYS:
        value = outputs.get(key)
        for rel in ([value] if isinstance(value, str) else list(value or [])):
            files.append(Path(out) / rel)
    return files


def push_output_set(url: str, out: str | os.PathLike[str], outputs: Mapping[str, Any],
                    options: DicomWebOptions | None = None, *, argument: str = "--push") -> PushReport:
    """STOW-RS every DICOM object of a finished output set in ``out`` (see :func:`push_files`)."""
    files = output_set_files(out, outputs)
    expect(bool(files), argument, f"DICOM objects in {out} to send (a DICOM or DICOMweb input)",
           "none written (NIfTI / .npz input writes no DICOM)")
    return push_files(url, files, options, argument=argument, base=out)
