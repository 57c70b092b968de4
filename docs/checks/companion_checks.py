"""Smoke checks of the trained DLSR / DiffGuard companions on a handful of real dev slices
(ground-truth slices stand in for reconstructions: no posterior sampling).

usage: OMP_NUM_THREADS=1 python docs/checks/companion_checks.py mri|ct N_SLICES OUT.json
"""
import json
import sys
import time

import numpy as np
import torch

from klip_med.data.manifest import read_manifest
from klip_med.data.selection import select_slices
from klip_med.eval.companions import companion_dir
from klip_med.eval.diffguard import guided_regeneration, load_diffguard
from klip_med.eval.dlsr import load_dlsr
from klip_med.eval.levels import level_of
from klip_med.eval.metrics import lesion_blocks, localisation
from klip_med.eval.prior_maps import anoddpm_map
from klip_med.priors import load
from klip_med.score.blocks import blocks_inside_mask, pool_blocks

torch.set_num_threads(1)
case, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
name, manifest = {"mri": ("mri-brain-flair-128", "data_manifests/lgg_flair_128.json"),
                  "ct": ("ct-abdomen-128", "data_manifests/ct_L067.json")}[case]
m = read_manifest(manifest, "/work/shared/data")
prior = load(name)
dlsr = load_dlsr(companion_dir(name, "dlsr"), prior)
clf, cfg = load_diffguard(companion_dir(name, "diffguard"), prior)
n_levels = clf.n_levels
kw = {} if case == "mri" else {"lesions": "inserted", "shift": "hypo"}
slices = select_slices(m, "dev", prior, max_patients=max(1, n // 2) if case == "mri" else None,
                       max_slices_per_patient=2, seed=0, **kw)[:n]
depth = {}
for item in m.split("dev"):
    with np.load(item.path) as d:
        depth[item.relative] = d[m.array_key].shape[0]
rows = []
for s in slices:
    x = torch.from_numpy(s.image)
    t0 = time.perf_counter()
    level = level_of(s.info["slice"], depth[s.info["file"]], n_levels)
    with torch.no_grad():
        p = torch.softmax(clf(x[None, None], torch.zeros(1)), 1)[0]
    label = p.argmax().reshape(1)
    guided, _ = guided_regeneration(prior, clf, x[None, None], label, torch.Generator().manual_seed(1), 0.4, 10, 2.0)
    plain, _ = guided_regeneration(prior, clf, x[None, None], label, torch.Generator().manual_seed(1), 0.4, 10, 0.0)
    with torch.no_grad():
        pg = torch.softmax(clf(guided, torch.zeros(1)), 1)[0]
        pu = torch.softmax(clf(plain, torch.zeros(1)), 1)[0]
        fg = (clf.features(x[None, None]) - clf.features(guided)).square().mean(1)
        fu = (clf.features(x[None, None]) - clf.features(plain)).square().mean(1)
    dl, _ = dlsr.score_map(prior, x, torch.Generator().manual_seed(2))
    an, _, _ = anoddpm_map(prior, x, torch.Generator().manual_seed(3), 0.25, 5)
    up = lambda f: torch.nn.functional.interpolate(f[None], size=(128, 128), mode="nearest")[0, 0]  # noqa: E731
    row = {"key": s.key, "label": s.label, "true_level": level, "predicted_level": int(label),
           "p_pred": round(float(p.max()), 3),
           "p_target_guided": round(float(pg[label]), 3), "p_target_unguided": round(float(pu[label]), 3),
           "pixel_change_guided": round(float((guided - x).abs().mean()), 4),
           "pixel_change_unguided": round(float((plain - x).abs().mean()), 4),
           "guided_minus_unguided": round(float((guided - plain).abs().mean()), 4),
           "feature_mismatch_guided": round(float(fg.mean()), 4), "feature_mismatch_unguided": round(float(fu.mean()), 4),
           "seconds": round(time.perf_counter() - t0, 1)}
    if s.label:
        inside = blocks_inside_mask(torch.from_numpy(s.image > -0.9), 8).numpy()
        lab = lesion_blocks(s.lesion, 8)
        for nm, mp in (("diffguard", up(fg)), ("diffguard_unguided", up(fu)), ("dlsr", dl), ("anoddpm", an)):
            loc = localisation(pool_blocks(mp.float(), 8).densities.numpy(), lab, inside)
            row[f"loc_auroc_{nm}"] = None if loc.auroc is None else round(loc.auroc, 3)
    rows.append(row)
    print(json.dumps(row), flush=True)
summary = {"prior": name, "n": len(rows), "level_accuracy": float(np.mean([r["true_level"] == r["predicted_level"] for r in rows])),
           "within_one": float(np.mean([abs(r["true_level"] - r["predicted_level"]) <= 1 for r in rows]))}
for k in ("p_target_guided", "p_target_unguided", "pixel_change_guided", "pixel_change_unguided",
          "guided_minus_unguided", "feature_mismatch_guided", "feature_mismatch_unguided"):
    summary[k] = round(float(np.mean([r[k] for r in rows])), 4)
for k in ("loc_auroc_diffguard", "loc_auroc_diffguard_unguided", "loc_auroc_dlsr", "loc_auroc_anoddpm"):
    v = [r[k] for r in rows if r.get(k) is not None]
    summary[k] = round(float(np.mean(v)), 3) if v else None
json.dump({"summary": summary, "rows": rows}, open(out, "w"), indent=1)
print(json.dumps(summary))
