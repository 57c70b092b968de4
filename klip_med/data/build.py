"""The pure parts of building a data manifest from a user's own scans (``klip-med manifest``):
patient splits, file names, deterministic ``.npz`` bytes and the summary table.

Reading DICOM / NIfTI and resampling live in :mod:`klip_med.pipeline.build_manifest` (``data``
imports nothing of ours but the error type, so it cannot reach ``io``).

Splits are by patient: the sorted unique patient ids are permuted with
``numpy.random.default_rng(seed)`` and cut into train / dev / test by the fractions (largest
remainders; every split with a positive fraction gets at least one patient). The same ids and seed
always give the same assignment, whatever order the series were found in.
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from collections.abc import Sequence

import numpy as np

from klip_med.data.manifest import SPLITS
from klip_med.errors import expect

ARRAY_KEYS = {"CT": "hu", "MR": "image"}
"""The npz array holding the slices, per modality."""
SPACING_KEY = "pixel_spacing_mm"
"""The npz array with the (row, column) pixel spacing in mm, as the readers look it up."""
DEFAULT_LICENCE = "user data: not for redistribution"
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
CREATED_BY = "klip-med manifest"
"""The manifest's ``created_by``."""
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def safe_name(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return _SAFE.sub("_", text.strip()).strip("._") or "_"


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` (or three numbers) -> train / dev / test fractions, >= 0, summing to 1."""
    try:
        values = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        values = ()
    expect(len(values) == 3 and all(v >= 0 and math.isfinite(v) for v in values)
           and abs(sum(values) - 1.0) < 1e-6, "--split-fractions",
           "three non-negative train,dev,test fractions summing to 1 (e.g. 0.7,0.15,0.15)", repr(text))
    return values  # type: ignore[return-value]


def split_counts(n_patients: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Patients per split: largest remainders, then one moved to every empty split with a positive
    fraction (from the largest split). Raises when there are fewer patients than such splits."""
    needed = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0]
    expect(n_patients >= len(needed), "--split-fractions",
           f"at least {len(needed)} patients for the splits {', '.join(needed)} (splits are by patient); "
           "use --split-fractions 1,0,0 to put every series in train",
           f"{n_patients} patient(s)")
    raw = [f * n_patients for f in fractions]
    counts = [math.floor(r) for r in raw]
    for k in sorted(range(3), key=lambda k: (-(raw[k] - counts[k]), k))[: n_patients - sum(counts)]:
        counts[k] += 1
    for k in range(3):
        if fractions[k] > 0 and counts[k] == 0:
            donor = max(range(3), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[k] += 1
    return counts[0], counts[1], counts[2]


def assign_splits(patients: Sequence[str], fractions: Sequence[float], seed: int = 0) -> dict[str, str]:
    """Patient id -> ``train`` / ``dev`` / ``test``: a permutation of the sorted ids drawn with
    ``numpy.random.default_rng(seed)``, cut by :func:`split_counts`. Same ids and seed, same result."""
    unique = sorted(set(patients))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    counts = split_counts(len(unique), fractions)
    bounds = np.cumsum(counts)
    return {p: SPLITS[int(np.searchsorted(bounds, k, side="right"))] for k, p in enumerate(order)}


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (deflate) with fixed zip timestamps: the same arrays give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(value), allow_pickle=False)
    return buffer.getvalue()


def summary_table(counts: dict[str, dict[str, int]]) -> str:
    """A Markdown table of patients, series and slices per split (from :attr:`BuildResult.counts`)."""
    rows = ["| split | patients | series | slices |", "|---|---|---|---|"]
    for split in SPLITS:
        c = counts[split]
        rows.append(f"| {split} | {c['patients']} | {c['series']} | {c['slices']} |")
    total = {k: sum(c[k] for c in counts.values()) for k in ("patients", "series", "slices")}
    rows.append(f"| all | {total['patients']} | {total['series']} | {total['slices']} |")
    return "\n".join(rows)
