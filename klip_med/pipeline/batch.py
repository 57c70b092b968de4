"""Many volumes through ``klip-med run``'s code path on an engine: what ``klip-med batch`` does.

    from klip_med import priors
    from klip_med.pipeline.batch import run_batch
    from klip_med.pipeline.batch_inputs import read_batch_inputs
    from klip_med.pipeline.engine import EngineOptions

    prior = priors.load("ct-abdomen-128")
    index = run_batch(read_batch_inputs("cohort.txt"), prior, "ct-abdomen-128", options, "out/",
                      EngineOptions("ray", workers=4, gpus_per_worker=1))

Each input (:mod:`klip_med.pipeline.batch_inputs`) goes to ``OUT/<name>/`` with exactly the outputs
of ``klip-med run``: :func:`klip_med.pipeline.volume.run_volume` writes them, the function ``run``
calls. Its ``summary.json`` gains one key, ``batch``: the input as listed, its name, and the request
digest (below).

Finished, resumed, retried:

- A series is finished when ``OUT/<name>/summary.json`` holds this batch's request digest: a hash
  of the input's signature (file sizes and modification times, a manifest item's checksum), the
  prior's weights, the physics, the settings and windows, the slice batch, the threshold and the null
  model. ``run_volume`` writes ``summary.json`` after every other output (each written atomically),
  so a series stopped at any point is never taken as finished.
- A rerun skips finished series before any worker starts (status ``skipped``) and resumes the others
  slice by slice (``run``'s own resume); series that failed are tried again.
- When a worker dies mid-series the engine runs the series again on the restarted worker: it resumes
  from the slices already saved, after removing the hidden temporary files the killed writer left.
- A series folder holding a run with other settings fails with ``run``'s message (use another
  ``--out``) rather than mixing results. Run one batch per ``OUT`` at a time.

``OUT/index.jsonl`` is rewritten (atomically) as each series ends: one line per input in list
order, each with the same keys (``None`` when absent): ``input``, ``name``, ``status`` (``done``
this run, ``skipped`` finished before, ``failed``, ``pending``), ``error``, ``score`` (image score,
nats per pixel) and ``score_slice``, ``max_null_z``, ``volume_p`` and ``slice_p`` (with a null
model: how often a healthy volume, and a healthy slice, with as many in-body blocks reaches the
largest z found; summary.json's ``null`` levels), ``slices``, ``slices_computed`` (by the run that finished the series), ``seconds`` (this run), ``sampling_s`` (all
slices, when they were sampled), ``device``, ``worker``, ``traceback`` (errors that are not bad
input). The last line is ``{"summary": {...}}``: counts of each status, engine, workers, seconds,
series per hour.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klip_med._atomic import atomic_path
from klip_med.errors import expect
from klip_med.io.json_files import jsonable
from klip_med.pipeline.batch_inputs import BatchInput, input_signature, load_input
from klip_med.pipeline.engine import EngineOptions, Outcome, run_items
from klip_med.pipeline.volume import RunOptions, run_volume
from klip_med.priors.identity import prior_identity
from klip_med.priors.registry import available

INDEX = "index.jsonl"
STATUSES = ("done", "skipped", "failed", "pending")
FIELDS = ("score", "score_slice", "max_null_z", "volume_p", "slice_p", "slices", "slices_computed", "sampling_s",
          "device")


def request_digest(inp: BatchInput, weights_sha256: str, options: RunOptions,
                   network: dict[str, bool] | None = None) -> str:
    """SHA-256 of what a series' outputs depend on (see the module docstring)."""
    request = {"input": input_signature(inp), "prior_weights_sha256": weights_sha256, "physics": options.physics,
               "settings": options.settings.describe(), "slice_batch": options.slice_batch,
               "threshold": options.threshold, "null": options.null, "network": network or {}}
    return hashlib.sha256(json.dumps(jsonable(request), sort_keys=True, default=str).encode()).hexdigest()


def finished_summary(folder: Path, request: str) -> dict[str, Any] | None:
    """The series' ``summary.json`` if it finished for ``request``, else None."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    batch = summary.get("batch") if isinstance(summary, dict) else None
    return summary if isinstance(batch, dict) and batch.get("request") == request else None


def series_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """The index fields a series' ``summary.json`` gives."""
    null = summary.get("null") or {}
    z = [v for v in null.get("max_z_per_slice") or [] if v is not None]
    timings = summary.get("timings", {})
    return {
        "score": summary["score"]["max_nats_per_pixel"], "score_slice": summary["score"]["slice"],
        "max_null_z": max(z) if z else None, "volume_p": null.get("volume_p"), "slice_p": null.get("slice_p"),
        "slices": len(summary.get("slices", [])), "slices_computed": timings.get("slices_computed_this_invocation"),
        "sampling_s": timings.get("sampling_s_all_slices"), "device": summary.get("device"),
    }


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the hidden ``.NAME.XXXX.tmp...`` files of atomic writes a killed worker left in ``folder``."""
    stale = [f for f in folder.rglob(".*") if f.is_file() and ".tmp" in f.name]
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


@dataclass(frozen=True)
class SeriesJob:
    """What every worker of a batch needs (picklable); calling it loads the prior on the worker once.

    Attributes:
        prior_reference: shipped prior name or folder, as ``--prior`` (recorded in each summary).
        prior_location: what each worker loads: the name, or the folder as an absolute path.
        weights_sha256: the weights the batch was started with (a worker with others refuses).
        options: physics, settings with windows, slice batch, threshold, device, null.
        out: the batch's output folder.
        network: opt-in network execution (:meth:`~klip_med.priors.diffusion.DiffusionPrior.set_execution`:
            ``channels_last``, ``bf16``); empty: as ``run``, bit for bit.
        dicomweb: how series URLs are reached (credential, TLS, timeout, retries;
            :class:`~klip_med.io.dicomweb.DicomWebOptions`, whose secret never shows in a repr), or None.
    """

    prior_reference: str
    prior_location: str
    weights_sha256: str
    options: RunOptions
    out: str
    network: tuple[tuple[str, bool], ...] = ()
    dicomweb: Any = None

    def __call__(self) -> Callable[[tuple[BatchInput, str]], dict[str, Any]]:
        return SeriesRunner(self)


class SeriesRunner:
    """A worker's item function: one series (``(input, request digest)``) to ``OUT/<name>/``."""

    def __init__(self, job: SeriesJob) -> None:
        from klip_med import priors

        self.job = job
        self.prior = priors.load(job.prior_location, device=job.options.device)
        found = prior_identity(self.prior)["weights_sha256"]
        expect(found == job.weights_sha256, f"--prior {job.prior_reference}",
               f"the weights the batch started with (sha256 {job.weights_sha256[:12]}...)",
               f"sha256 {found[:12]}... on this worker (install the same prior on every node)")
        if job.network:
            self.prior.set_execution(**dict(job.network))

    def __call__(self, work: tuple[BatchInput, str]) -> dict[str, Any]:
        inp, request = work
        folder = Path(self.job.out) / inp.name
        summary = finished_summary(folder, request)
        if summary is not None:  # e.g. its worker died after writing summary.json
            return {"status": "skipped", **series_fields(summary)}
        if folder.is_dir():
            remove_stale_temporaries(folder)
        started = time.perf_counter()
        run_input = load_input(inp, self.prior, self.job.dicomweb)
        summary = run_volume(
            run_input, self.prior, self.job.options, folder, prior_reference=self.job.prior_reference,
            progress=False, title=f"klip-med run: {Path(inp.location).name}",
            summary_extra={"timings": {"prepare_s": round(time.perf_counter() - started, 2)},
                           "batch": {"input": inp.source, "name": inp.name, "request": request}},
        )
        return {"status": "done", **series_fields(summary)}


def index_line(inp: BatchInput, status: str, fields: dict[str, Any] | None = None,
               outcome: Outcome | None = None) -> dict[str, Any]:
    """One line of ``index.jsonl`` (every key present, None when unknown)."""
    line: dict[str, Any] = {"input": inp.source, "name": inp.name, "status": status, "error": None}
    line.update({k: (fields or {}).get(k) for k in FIELDS})
    line.update({"seconds": None if outcome is None else outcome.seconds,
                 "worker": None if outcome is None else outcome.worker or None,
                 "error": None if outcome is None else outcome.error,
                 "traceback": None if outcome is None else outcome.traceback})
    return line


def write_index(out: Path, lines: Sequence[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """Write ``OUT/index.jsonl`` atomically: the lines, then ``{"summary": ...}``."""
    text = "".join(json.dumps(jsonable(line)) + "\n" for line in [*lines, {"summary": summary}])
    with atomic_path(out / INDEX) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out / INDEX


def run_batch(
    inputs: Sequence[BatchInput],
    prior,
    prior_reference: str,
    options: RunOptions,
    out: str | Path,
    engine: EngineOptions,
    *,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    network: dict[str, bool] | None = None,
    dicomweb=None,
) -> list[dict[str, Any]]:
    """Run every input not finished yet (module docstring) and keep ``OUT/index.jsonl`` current.

    Args:
        inputs: from :func:`klip_med.pipeline.batch_inputs.read_batch_inputs` (names unique).
        prior: the prior, loaded here (its weights' digest goes into each request).
        prior_reference: as ``--prior``: a shipped name (each worker loads it by name) or a folder
            (loaded by its absolute path: the same path on every node); recorded in each summary.
        options: as for ``run``, windows included (each worker uses ``options.device``).
        engine: local or Ray, workers, resources, retries.
        progress: a progress bar over series on stderr (when it is a terminal).
        echo: called with one line per series as it ends (default: print to stdout, flushed).
        network: opt-in network execution options (:class:`SeriesJob`; ``summary.json`` records them).
        dicomweb: how series URLs in ``inputs`` are reached (:class:`SeriesJob`).

    Returns:
        The index lines, in input order.
    """
    from tqdm.auto import tqdm

    out = Path(out).resolve()  # workers elsewhere (a Ray node) have another working folder
    names = [inp.name for inp in inputs]
    expect(len(set(names)) == len(names), "inputs", "unique output names",
           f"repeated {sorted({n for n in names if names.count(n) > 1})[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    weights = prior_identity(prior)["weights_sha256"]
    by_name = {inp.name: inp for inp in inputs}
    lines: dict[str, dict[str, Any]] = {}
    work = []
    for inp in inputs:
        request = request_digest(inp, weights, options, network)
        summary = finished_summary(out / inp.name, request)
        if summary is not None:
            lines[inp.name] = index_line(inp, "skipped", series_fields(summary))
        else:
            lines[inp.name] = index_line(inp, "pending")
            work.append((inp.name, (inp, request)))
    started = time.perf_counter()

    def summary_line() -> dict[str, Any]:
        counts = {s: sum(line["status"] == s for line in lines.values()) for s in STATUSES}
        seconds = time.perf_counter() - started
        return {"inputs": len(inputs), **counts, "engine": engine.engine, "workers": engine.workers,
                "seconds": round(seconds, 2),
                "series_per_hour": round(counts["done"] / seconds * 3600, 2) if counts["done"] else None,
                "prior": prior_reference, "physics": options.physics}

    say = echo or (lambda text: print(text, flush=True))
    write_index(out, list(lines.values()), summary_line())
    bar = tqdm(total=len(inputs), initial=len(inputs) - len(work), unit="series", desc="klip-med batch",
               disable=None if progress else True, file=sys.stderr)

    def on_outcome(outcome: Outcome) -> None:
        value = outcome.value or {}
        status = value.get("status", "done") if outcome.ok else "failed"
        lines[outcome.key] = index_line(by_name[outcome.key], status, value, outcome)
        write_index(out, list(lines.values()), summary_line())
        bar.update(1)
        what = (f"score {value['score']:.4g} nats/pixel" if outcome.ok and value.get("score") is not None
                else outcome.error)
        done = sum(line["status"] != "pending" for line in lines.values())
        message = f"[{done}/{len(inputs)}] {status} {outcome.key}: {what} ({outcome.seconds:.1f} s, {outcome.worker})"
        if echo is None and not bar.disable:
            bar.write(message, file=sys.stdout)  # above the bar
        else:
            say(message)

    try:
        location = prior_reference if prior_reference in available() else str(Path(prior_reference).resolve())
        job = SeriesJob(prior_reference, location, weights, options, str(out), tuple(sorted((network or {}).items())),
                        dicomweb)
        run_items(job, work, engine, on_outcome)
    finally:
        bar.close()
        write_index(out, list(lines.values()), summary_line())
    return list(lines.values())
