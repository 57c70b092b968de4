"""Many benchmarks in one process under a time budget, one JSON file that grows as they finish.

A GPU lease is short and a compiled network is expensive to build, so a session runs its whole
list of benchmarks in one process (imports, CUDA context and compile caches are paid once), in
order of importance, skipping what no longer fits before ``deadline``, and rewrites its JSON file
(atomically) after every entry: a session killed half-way still returns the entries it finished.
An entry that fails (a compiler error, out of memory) is recorded with its error and the next one
runs.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from klip_med.bench.core import run_bench, write_report
from klip_med.bench.settings import BenchSettings
from klip_med.errors import expect

SUITE_FORMAT = "klip-med-bench-suite"


@dataclass(frozen=True)
class SuiteEntry:
    """One benchmark of a suite.

    Attributes:
        label: a unique name (``fast-bf16-cudagraphs``).
        settings: what it runs.
        min_seconds: skip it unless this much time is left before the deadline (compiling
            entries need more than eager ones).
        note: what it is for, in words (kept in the JSON).
    """

    label: str
    settings: BenchSettings
    min_seconds: float = 0.0
    note: str = ""


def summary_row(label: str, report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one report (the table a session prints last)."""
    roof = report.get("roofline") or {}
    return {
        "label": label, "sampler": report["sampler"], "dtype": report["dtype"], "compile": report["compile"],
        "batch": report["batch"], "samples": report["samples"], "steps": report["steps"],
        "seconds_per_slice": report["seconds_per_slice"], "warmup_seconds": report.get("warmup_seconds"),
        "klip_overhead_fraction": report["klip_overhead_fraction"],
        "klip_overhead_isolated_fraction": report["klip_overhead_isolated_fraction"],
        "psnr_db": report["psnr_db"], "deepinv_seconds_per_slice": report["deepinv_seconds_per_slice"],
        "deepinv_psnr_db": report["deepinv_psnr_db"], "bf16_klip_max_rel_error": report["bf16_klip_max_rel_error"],
        "achieved_network_tflops": roof.get("achieved_network_tflops"),
        "fraction_of_matmul_rate": roof.get("fraction_of_matmul_rate"),
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table of :func:`summary_row` rows (``-`` for missing values)."""
    columns = [("label", "{}"), ("seconds_per_slice", "{:.4f}"), ("warmup_seconds", "{:.1f}"),
               ("klip_overhead_fraction", "{:+.2%}"), ("klip_overhead_isolated_fraction", "{:.3%}"),
               ("psnr_db", "{:.2f}"), ("deepinv_seconds_per_slice", "{:.4f}"), ("deepinv_psnr_db", "{:.2f}"),
               ("bf16_klip_max_rel_error", "{:.2e}"), ("achieved_network_tflops", "{:.2f}"),
               ("fraction_of_matmul_rate", "{:.2%}")]
    heads = ["label", "s/slice", "warmup s", "KLIP ovh", "acc alone", "PSNR", "deepinv s", "dinv PSNR",
             "bf16 err", "TFLOP/s", "of matmul"]
    cells = [[("-" if row.get(key) is None else fmt.format(row[key])) for key, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def run_suite(entries: Sequence[SuiteEntry], path: str | Path, *, deadline: float | None = None,
              extra: dict[str, Any] | None = None, log: Callable[[str], None] = print,
              doc: dict[str, Any] | None = None,
              runner: Callable[[BenchSettings], dict[str, Any]] = run_bench) -> dict[str, Any]:
    """Run ``entries`` in order; returns (and keeps writing to ``path``) the suite document.

    Args:
        entries: the benchmarks, most important first; labels must be unique.
        path: the JSON file (rewritten atomically after every entry).
        deadline: ``time.time()`` after which no entry starts; an entry starts only if its
            ``min_seconds`` fit before it. None: no limit.
        extra: more top-level fields (the machine, the session's settings).
        log: where progress lines go.
        doc: an earlier suite document to append to (several passes, one file); labels stay unique.
        runner: the benchmark function (:func:`~klip_med.bench.core.run_bench`).

    The document: ``format``, ``started_utc``, ``deadline_utc``, ``entries`` (one per entry, in
    order: ``label``, ``note``, ``status`` = ok | skipped | error, ``seconds``, and ``report``,
    ``reason`` or ``error``), ``summary`` (:func:`summary_row` of each finished entry), ``extra``.
    """
    labels = [e["label"] for e in (doc or {}).get("entries", [])] + [e.label for e in entries]
    expect(len(set(labels)) == len(labels), "suite labels", "unique labels", str(labels))
    if doc is None:
        doc = {"format": SUITE_FORMAT, "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "entries": [], "summary": []}
    doc.update(extra or {})
    doc["deadline_utc"] = (datetime.fromtimestamp(deadline, timezone.utc).isoformat(timespec="seconds")
                           if deadline else None)
    write_report(doc, path)
    for entry in entries:
        record: dict[str, Any] = {"label": entry.label, "note": entry.note}
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < max(entry.min_seconds, 0.0):
            record.update(status="skipped", reason=f"time budget: {left:.0f} s left, needs {entry.min_seconds:.0f} s")
            log(f"[bench] {entry.label}: skipped ({record['reason']})")
        else:
            start = time.perf_counter()
            log(f"[bench] {entry.label}: running")
            try:
                report = runner(entry.settings)
            except Exception as exc:  # noqa: BLE001 - a session records a failed benchmark and goes on
                record.update(status="error", error=f"{type(exc).__name__}: {exc}",
                              traceback=traceback.format_exc(limit=6)[-4000:])
                log(f"[bench] {entry.label}: error {record['error'][:300]}")
            else:
                record.update(status="ok", report=report)
                doc["summary"].append(summary_row(entry.label, report))
                log(f"[bench] {entry.label}: {report['seconds_per_slice']:.4f} s/slice")
            record["seconds"] = round(time.perf_counter() - start, 2)
        doc["entries"].append(record)
        write_report(doc, path)
    return doc
