"""Seconds and network forwards per image of each post-hoc baseline on one real slice per prior
(1 thread, this loaded 2-core machine). usage: OMP_NUM_THREADS=1 python docs/checks/baseline_costs.py"""
import json

import torch

from klip_med.data.manifest import read_manifest
from klip_med.data.selection import select_slices
from klip_med.eval.baselines import BaselineSettings, post_hoc_baselines
from klip_med.eval.posthoc import PostHoc
from klip_med.priors import load

torch.set_num_threads(1)
for name, manifest in (("mri-brain-flair-128", "data_manifests/lgg_flair_128.json"),
                       ("ct-abdomen-128", "data_manifests/ct_L067.json")):
    m = read_manifest(manifest, "/work/shared/data")
    prior = load(name)
    s = select_slices(m, "dev", prior, max_patients=1, max_slices_per_patient=1, seed=0)[0]
    settings = BaselineSettings()
    names = ["anoddpm", "eigenscore", "cfs", "dlsr", "diffguard", "monai_likelihood"]
    post = PostHoc(m, prior, name, "-", {}, "", settings, torch.device("cpu"), 0, 0.3, print)
    models = post.models(names)
    out = post_hoc_baselines(prior, torch.from_numpy(s.image), torch.Generator().manual_seed(0), settings, names, **models)
    print(json.dumps({"prior": name, "slice": s.key, **{k: {"nfe": v.nfe, "seconds": v.seconds} for k, v in out.items()}}))
