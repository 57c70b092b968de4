"""Read-only: are the version-2 slice caches of a running MRI 4x dev benchmark (runs/mri4x_dev) recognised by today's PostHoc?"""
import shlex
from dataclasses import replace

import torch

from klip_med.cli.eval import EVAL_DEFAULTS, add_parser
from klip_med.cli.common import settings_from_args
from klip_med.data.manifest import read_manifest
from klip_med.data.selection import select_slices
from klip_med.eval.baselines import BaselineSettings
from klip_med.eval.cache import cached_fingerprint, slice_path
from klip_med.eval.posthoc import PostHoc
from klip_med.eval.runner import _windows
from klip_med.priors import load
from klip_med.priors.identity import prior_identity
import argparse

cmd = ("eval --manifest data_manifests/lgg_flair_128.json --data-root ../shared/data --prior mri-brain-flair-128 "
       "--physics mri:accel=4,center=0.08,noise=0.01 --split dev --samples 4 --steps 50 --max-patients 15 --max-slices 6 "
       "--skip eigenscore --windows full t:0,0.1 t:0.1,1 t:0.1,0.2 t:0.2,0.3 t:0.3,0.4 t:0.4,0.5 t:0.5,0.6 t:0.6,0.7 "
       "t:0.7,0.8 t:0.8,0.9 t:0.9,1 --out runs/mri4x_dev --seed 0")
p = argparse.ArgumentParser()
add_parser(p.add_subparsers(dest="c"))
args = p.parse_args(shlex.split(cmd))
settings = replace(settings_from_args(args, EVAL_DEFAULTS), block_size=args.block_size[0], top_k=args.top_k)
prior = load("mri-brain-flair-128")
settings = replace(settings, windows=_windows(args.windows, prior, settings.steps))
m = read_manifest(args.manifest, "/work/shared/data")
slices = select_slices(m, "dev", prior, 15, 6, "auto", 0)
sampling = {k: v for k, v in settings.describe().items() if k not in ("top_k", "block_size")}
post = PostHoc(m, prior, "mri-brain-flair-128", args.physics, sampling, prior_identity(prior)["weights_sha256"],
               BaselineSettings(skip=("eigenscore",)), torch.device("cpu"), 0)
ok = 0
seen = 0
for item in slices:
    path = slice_path(__import__("pathlib").Path("runs/mri4x_dev/slices"), item.key)
    stored = cached_fingerprint(path)
    if stored is None:
        continue
    seen += 1
    ok += post.accepts(stored, item, post.stamp(item))
print(f"{len(slices)} selected, {seen} cached, {ok} recognised as the same sampling run")
