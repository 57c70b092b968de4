"""`run_slices`: a run reads its own cached slices, not those of runs sharing its slices folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from klip_med.errors import KLIPMedError
from klip_med.eval.cache import CachedSlice, run_slices, slice_path, write_slice


def _entry(key: str, label: int) -> CachedSlice:
    z = np.zeros((8, 8), bool)
    return CachedSlice(key, "p1", label, {"klip[full]": np.full((8, 8), float(label), np.float32)}, z, ~z,
                       np.zeros((4, 8, 8), np.float32), {})


def _run(tmp_path, name: str, keys: list[str] | None):
    run = tmp_path / name
    run.mkdir()
    (run / "slices").symlink_to(tmp_path / "shared", target_is_directory=True)
    if keys is not None:
        (run / "results.json").write_text(json.dumps({"slices": [{"key": k} for k in keys]}))
    return run


def test_runs_sharing_a_folder_read_only_their_own_slices(tmp_path):
    shared = tmp_path / "shared"
    for key, label in (("a[1]", 0), ("a[1]+hypo", 1), ("a[1]+star", 1)):
        write_slice(slice_path(shared, key), _entry(key, label))
    hypo = _run(tmp_path, "hypo", ["a[1]", "a[1]+hypo"])
    star = _run(tmp_path, "star", ["a[1]", "a[1]+star"])
    running = _run(tmp_path, "running", None)
    assert sorted(e.key for e in run_slices(hypo)) == ["a[1]", "a[1]+hypo"]
    assert sorted(e.key for e in run_slices(star, current_mask=False)) == ["a[1]", "a[1]+star"]
    assert len(run_slices(running)) == 3  # no results.json yet: every file of the folder


def test_a_listed_slice_missing_from_the_cache_is_named(tmp_path):
    (tmp_path / "shared").mkdir()
    run = _run(tmp_path, "gone", ["b[2]"])
    with pytest.raises(KLIPMedError, match="missing"):
        run_slices(run)
