"""A run's saved slices: one ``OUT/slices/slice_NNNNN.npz`` per finished slice (atomic), the
run's fingerprint in ``OUT/slices/run.json``, and the checks that make a rerun resume rather than
mix results (same input, prior, physics, settings and slice batch, or refused)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from klip_med._atomic import atomic_path
from klip_med.errors import KLIPMedError, expect
from klip_med.io.outputs import VolumeResult

RUN_FORMAT = 1
SLICES_DIR = "slices"


def slice_path(folder: Path, k: int) -> Path:
    return folder / f"slice_{k:05d}.npz"


def save_slice(path: Path, k: int, result) -> None:
    record = {
        "slice": k,
        "score": {"max": result.score.max, "topk_mean": result.score.topk_mean,
                  "argmax_block": list(result.score.argmax), "blocks_in_body": result.score.blocks_in_mask},
        "top_blocks": result.top_blocks(3),
        "seconds": result.metadata["seconds"],
        "network_calls": result.metadata["network_calls"],
        "device": result.metadata["device"],
        "klip": result.metadata["klip"],  # the summary keeps one copy (the same for every slice)
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh, recon=result.recon_mean.numpy(), recon_std=result.recon_std.numpy(),
            baseline=result.baseline.numpy(), klip=result.klip.numpy(),
            klip_sample_std=result.klip_sample_std.numpy(), body=result.body_mask.numpy(),
            densities=result.blocks.densities.numpy(), inside=result.inside.numpy(),
            record=np.array(json.dumps(record)),
        )


def load_slice(path: Path) -> dict[str, Any] | None:
    """A saved slice, or None when absent or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: np.asarray(data[k]) for k in data.files}
        out["record"] = json.loads(str(out["record"]))
        return out
    except Exception:
        return None


def run_fingerprint(model: np.ndarray, prior, options) -> dict[str, Any]:
    config = json.dumps(prior.config.to_dict(), sort_keys=True).encode()
    return {
        "format": RUN_FORMAT,
        "input_sha256": hashlib.sha256(np.ascontiguousarray(model, dtype=np.float32).tobytes()).hexdigest(),
        "input_shape": list(model.shape),
        "prior_config_sha256": hashlib.sha256(config).hexdigest(),
        "physics": options.physics,
        "settings": options.settings.describe(),
        "slice_batch": options.slice_batch,
    }


def check_resume(folder: Path, fingerprint: dict[str, Any]) -> None:
    path = folder / "run.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
        differ = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if not differ:
            return
        expect(not any(folder.glob("slice_*.npz")), f"--out {folder.parent}",
               "a new folder, or one holding a run with the same input, prior, physics, settings and "
               "slice batch (to resume it)", f"a run that differs in {', '.join(differ)} "
               f"(use another --out, or delete {folder} to start over)")
    with atomic_path(path) as tmp:  # a new run (or one that had not finished a slice yet)
        tmp.write_text(json.dumps(fingerprint, indent=1) + "\n", encoding="utf-8")


def prepare_out(out: str | Path) -> Path:
    """Create the output folder; raise early if the path is a file."""
    p = Path(out)
    expect(not p.exists() or p.is_dir(), "--out", "a folder (new or existing)", f"a file {str(p)!r}")
    try:
        (p / SLICES_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KLIPMedError(f"--out: expected a folder that can be created, found {exc}") from exc
    return p



def stack_slices(records: list[dict[str, Any]], block_size: int) -> VolumeResult:
    def cat(key: str, axis: int = 0) -> np.ndarray:
        return np.stack([r[key] for r in records], axis=axis)

    return VolumeResult(
        recon=cat("recon"), recon_std=cat("recon_std"), baseline=cat("baseline"),
        klip=cat("klip", axis=1), klip_sample_std=cat("klip_sample_std", axis=1), body=cat("body"),
        densities=cat("densities"), inside=cat("inside"), slices=[r["record"] for r in records],
        block_size=block_size,
    )

