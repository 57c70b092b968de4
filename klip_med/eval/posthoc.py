"""The benchmark cache in two parts: a slice's sampling run, and the baselines computed after it.

A cached slice file (:mod:`klip_med.eval.cache`) is reused when its ``fingerprint`` is the run's
*sampling* fingerprint: the slice (key, seed key, ground truth, lesion), the physics, the sampler
settings, the prior's weights and which of the baselines computed with the run
(posterior_std, residual, brightness, brightness_dev, centrality) are skipped. The baselines of
:data:`~klip_med.eval.names.POST_HOC` read only the cached posterior mean (``images[2]``); each
carries its own fingerprint in ``meta["post_hoc"][name]`` (its settings, and the data / model it
uses: the ``cfs`` training files, the ``dlsr`` / ``diffguard`` companion weights). A baseline that is
missing or out of date is computed from the cached posterior mean and the file is rewritten: adding
a baseline, or changing one's settings, never samples a slice again.

Caches written before this split (cache version 2, whose fingerprint also covered the settings of
every baseline) are recognised when the skip list they were made with was the run's own or a subset
of ``anoddpm`` / ``eigenscore`` / ``cfs`` (any order) added to it: their sampling run is kept, and their
post-hoc baselines are recomputed the current way (from the float16 posterior mean, each with its own
generator), so old and new slices of one run agree.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from klip_med.eval.baselines import BaselineSettings, post_hoc_baselines
from klip_med.eval.cache import CachedSlice, fingerprint
from klip_med.eval.names import POST_HOC

CACHE_VERSION = 3
LEGACY_VERSION = 2
LEGACY_BASELINES = ("posterior_std", "residual", "anoddpm", "eigenscore", "cfs", "brightness", "brightness_dev",
                    "centrality")
"""The baselines of cache version 2."""
LEGACY_POST_HOC = ("anoddpm", "eigenscore", "cfs")
"""Those of them computed from the posterior mean alone."""


class PostHoc:
    """The fingerprints of one benchmark run and the post-hoc baselines it wants.

    Args:
        manifest: the read manifest (its train split fits ``cfs``).
        prior: the loaded prior; ``prior_reference``: the name / folder it came from (where the
            ``dlsr`` / ``diffguard`` companions are looked up, :mod:`klip_med.eval.companions`).
        physics_spec, sampling: the physics string and the sampler settings that change the maps
            (``KLIPSettings.describe()`` minus what is chosen after sampling).
        prior_sha: the prior's weights digest. baselines: the run's baseline settings.
    """

    def __init__(self, manifest, prior, prior_reference, physics_spec: str, sampling: dict, prior_sha: str,
                 baselines: BaselineSettings, device: torch.device, seed: int, min_body_fraction: float = 0.3,
                 log: Callable[[str], None] | None = None) -> None:
        self.manifest, self.prior, self.reference = manifest, prior, prior_reference
        self.baselines, self.device, self.seed, self.min_body_fraction = baselines, device, seed, min_body_fraction
        self.say = log or (lambda _msg: None)
        self.wanted = [b for b in POST_HOC if b not in baselines.skip]
        in_run_skip = [b for b in baselines.skip if b not in POST_HOC]
        self.in_run = replace(baselines, skip=tuple(dict.fromkeys([*baselines.skip, *POST_HOC])))
        self.parts = {"physics": physics_spec, "settings": sampling, "prior": prior_sha, "in_run_skip": in_run_skip,
                      "version": CACHE_VERSION}
        self._legacy = {"physics": physics_spec, "settings": sampling, "prior": prior_sha, "version": LEGACY_VERSION}
        self._train_files = sorted({item.sha256 for item in manifest.split("train")})
        self._models: dict = {}
        self.stamps = {name: fingerprint({"baseline": name, **baselines.settings_of(name), **self._uses(name)})
                       for name in self.wanted}

    def _uses(self, name: str) -> dict:
        """What else a post-hoc baseline's map depends on (read before any sampling: a missing
        companion model is an error now, naming the command that trains it)."""
        if name == "cfs":
            return {"train_files": self._train_files}
        if name in ("dlsr", "diffguard"):
            from klip_med.eval.companions import companion_dir, read_companion
            from klip_med.priors.diffusion import WEIGHTS_FILE

            folder = companion_dir(self.reference, name)
            read_companion(folder, name, self.prior)
            return {"weights": _file_digest(folder / WEIGHTS_FILE)}
        return {}

    def stamp(self, item) -> str:
        """The sampling fingerprint of one selected slice."""
        return fingerprint({**self.parts, "key": item.key, "seed_key": item.seed_key}, (item.image, item.lesion))

    def accepts(self, stored: str | None, item, stamp: str) -> bool:
        """Whether a cached file's fingerprint holds this run's sampling run of ``item``."""
        if stored is None:
            return False
        return stored == stamp or stored in self._legacy_stamps(item)

    def _legacy_stamps(self, item) -> set[str]:
        legacy = [b for b in self.baselines.skip if b in LEGACY_BASELINES]
        in_run = [b for b in legacy if b not in LEGACY_POST_HOC]
        lists = {tuple(legacy)}
        for r in range(len(LEGACY_POST_HOC) + 1):
            for extra in itertools.permutations(LEGACY_POST_HOC, r):
                lists.add((*in_run, *extra))
        d = self.baselines.describe()
        keys = ("anoddpm_t", "anoddpm_steps", "eigen_levels", "eigen_rank", "eigen_iterations", "eigen_fd",
                "cfs_train_slices", "cfs_t")
        out = set()
        for skip in lists:
            parts = {**self._legacy, "baselines": {**{k: d[k] for k in keys}, "skip": list(skip)}}
            if "cfs" not in skip:
                parts["train_files"] = self._train_files
            out.add(fingerprint({**parts, "key": item.key, "seed_key": item.seed_key}, (item.image, item.lesion)))
        return out

    def models(self, names) -> dict:
        """The fitted / trained models the post-hoc baselines ``names`` need (loaded once)."""
        if "cfs" in names and "feature_density" not in self._models:
            self._models["feature_density"] = fit_cfs(self.manifest, self.prior, self.baselines, self.seed,
                                                      self.device, self.min_body_fraction, self.say)
        for kind in ("dlsr", "diffguard"):
            if kind in names and kind not in self._models:
                from klip_med.eval.companions import companion_dir

                folder = companion_dir(self.reference, kind)
                if kind == "dlsr":
                    from klip_med.eval.dlsr import load_dlsr

                    self._models[kind] = load_dlsr(folder, self.prior, self.device)
                else:
                    from klip_med.eval.diffguard import load_diffguard

                    self._models[kind] = load_diffguard(folder, self.prior, self.device)[0]
        return {k: v for k, v in self._models.items() if k in ("feature_density", *names)}

    def complete(self, entry: CachedSlice, stamp: str, compute: bool = True) -> tuple[CachedSlice, CachedSlice, list[str]]:
        """Add the wanted post-hoc baselines a slice lacks (or holds out of date).

        Args:
            entry: a cached or freshly sampled slice (its ``images[2]`` is the posterior mean).
            stamp: the slice's sampling fingerprint (stored, replacing a version-2 one).
            compute: False: add nothing (``--metrics-only``).

        Returns:
            ``(stored, shown, added)``: the entry to write back (every map it holds), the entry the
            metrics see (no map of a skipped or out-of-date post-hoc baseline) and the names added.
        """
        done = dict(entry.meta.get("post_hoc", {}))
        todo = [n for n in self.wanted if done.get(n) != self.stamps[n]]
        maps, costs = dict(entry.maps), dict(entry.meta.get("costs", {}))
        if todo and compute:
            mean = torch.from_numpy(np.asarray(entry.images[2], dtype=np.float16).astype(np.float32))
            generator = torch.Generator(device=self.device).manual_seed(int(entry.meta["seed"]) + 2)
            for name, m in post_hoc_baselines(self.prior, mean, generator, self.baselines, todo,
                                              **self.models(todo)).items():
                maps[name] = np.asarray(m.pixel_map, dtype=np.float32)
                costs[name] = {"nfe": m.nfe, "seconds": m.seconds, "native_score": m.native_score, "info": m.info}
                done[name] = self.stamps[name]
        added = todo if todo and compute else []
        stored = replace(entry, maps=maps, meta={**entry.meta, "costs": costs, "post_hoc": done, "fingerprint": stamp})
        current = [n for n in self.wanted if done.get(n) == self.stamps[n]]
        hidden = [n for n in POST_HOC if n not in current]
        shown = replace(stored, maps={k: v for k, v in maps.items() if k not in hidden},
                        meta={**stored.meta, "costs": {k: v for k, v in costs.items() if k not in hidden}})
        return stored, shown, added


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fit_cfs(manifest, prior, baselines: BaselineSettings, seed: int, device: torch.device,
            min_body_fraction: float, say: Callable[[str], None]):
    """The ``cfs`` feature density of a run, fitted on the manifest's train split."""
    from klip_med.eval.features import fit_feature_density, training_slices

    t0 = time.perf_counter()
    images = training_slices(manifest, prior, baselines.cfs_train_slices, min_body_fraction)
    density = fit_feature_density(prior, images, torch.Generator(device=device).manual_seed(seed + 7),
                                  baselines.cfs_t)
    say(f"cfs: fitted the ID feature density on {density.n_slices} training slices "
        f"({density.n_locations} locations, {density.mean.numel()} features) in {time.perf_counter() - t0:.1f} s")
    return density
