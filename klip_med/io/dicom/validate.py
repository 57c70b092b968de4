"""Check written DICOM files with dicom3tools' ``dciodvfy`` (IOD / module / attribute rules).

Install: ``apt-get install -y dicom3tools`` (Debian / Ubuntu).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from klip_med.errors import expect


@dataclass(frozen=True)
class DciodvfyReport:
    """``dciodvfy`` findings for one file: its ``Error`` and ``Warning`` lines."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def dciodvfy_available() -> bool:
    """True when the ``dciodvfy`` binary is on PATH."""
    return shutil.which("dciodvfy") is not None


def run_dciodvfy(path: str | os.PathLike[str], timeout_s: float = 60.0) -> DciodvfyReport:
    """Run ``dciodvfy`` on one file and collect its error and warning lines."""
    exe = shutil.which("dciodvfy")
    expect(exe is not None, "dciodvfy", "dicom3tools installed (apt-get install dicom3tools)",
           "no dciodvfy on PATH")
    assert exe is not None
    done = subprocess.run([exe, os.fspath(path)], capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    lines = [ln.strip() for ln in (done.stdout + "\n" + done.stderr).splitlines()]
    return DciodvfyReport(
        errors=tuple(ln for ln in lines if ln.startswith("Error")),
        warnings=tuple(ln for ln in lines if ln.startswith("Warning")),
    )


# dciodvfy warnings our outputs may carry, each with the reason it is accepted.
OWN_WARNINGS: dict[str, str] = {
    r"attribute <Laterality>$": (
        "Laterality (General Series, type 2C) is written empty = unknown: the source does not say "
        "and dciodvfy reports its absence as an error"
    ),
    r"Unrecognized defined term <QUANTITY> for value 4 of attribute <(Frame|Image) Type>": (
        "Parametric Map value 4 (derived pixel contrast) is QUANTITY per the current standard; "
        "the Debian dicom3tools (2022) tables predate it"
    ),
}
# Warnings about attributes copied from the source header (patient / study / equipment / the
# modality's own attributes in the derived series): present in the source already.
INHERITED_WARNINGS: dict[str, str] = {
    r"Value is zero for value 1 of attribute <Patient's Weight>": "source patient module",
    r"Retired Person Name form": "source person-name values",
    r"needed to build DICOMDIR - (Patient ID|Study ID|Series Number)": "empty in the anonymised source",
    r"Unrecognized defined term <[^>]*> for value \d+ of attribute <(Coding Scheme Designator|Scan "
    r"Options|Image Type|Body Part Examined)>": "vendor terms in the source header",
    r"(Attribute is not present in standard DICOM IOD|contains attributes not present in standard "
    r"DICOM IOD)": "standard-extended attributes copied from the source image",
    r"(Retired attribute|contains retired attributes)": "retired attributes in the source header",
}


def unexplained(report: DciodvfyReport) -> list[str]:
    """Errors, plus warnings matching neither :data:`OWN_WARNINGS` nor :data:`INHERITED_WARNINGS`."""
    import re

    patterns = list(OWN_WARNINGS) + list(INHERITED_WARNINGS)
    left = [w for w in report.warnings if not any(re.search(p, w) for p in patterns)]
    return list(report.errors) + left
