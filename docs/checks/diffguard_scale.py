"""DiffGuard on real tumour slices at several guidance scales (ground truth stands in for the
reconstruction): does guidance change the re-generation or the map?
usage: OMP_NUM_THREADS=1 python docs/checks/diffguard_scale.py mri|ct SCALES..."""
import json
import sys

import numpy as np
import torch

from klip_med.data.manifest import read_manifest
from klip_med.data.selection import select_slices
from klip_med.eval.companions import companion_dir
from klip_med.eval.diffguard import diffguard_map, load_diffguard
from klip_med.eval.metrics import lesion_blocks, localisation
from klip_med.priors import load
from klip_med.score.blocks import blocks_inside_mask, pool_blocks

torch.set_num_threads(1)
case, scales = sys.argv[1], [float(v) for v in sys.argv[2:]]
name, manifest = {"mri": ("mri-brain-flair-128", "data_manifests/lgg_flair_128.json"),
                  "ct": ("ct-abdomen-128", "data_manifests/ct_L067.json")}[case]
m = read_manifest(manifest, "/work/shared/data")
prior = load(name)
clf, _ = load_diffguard(companion_dir(name, "diffguard"), prior)
kw = {} if case == "mri" else {"lesions": "inserted", "shift": "hypo"}
slices = [s for s in select_slices(m, "dev", prior, max_patients=4 if case == "mri" else None,
                                   max_slices_per_patient=2, seed=0, **kw) if s.label][:4]
res = {s_: {"loc": [], "kl": [], "change": []} for s_ in scales}
maps0 = {}
for s in slices:
    x = torch.from_numpy(s.image)
    inside = blocks_inside_mask(torch.from_numpy(s.image > -0.9), 8).numpy()
    for sc in scales:
        mp, _, info = diffguard_map(prior, clf, x, torch.Generator().manual_seed(1), 0.4, 10, sc)
        loc = localisation(pool_blocks(mp, 8).densities.numpy(), lesion_blocks(s.lesion, 8), inside)
        res[sc]["loc"].append(loc.auroc)
        res[sc]["kl"].append(info["level_kl"])
        res[sc]["change"].append(info["pixel_change"])
        if sc == scales[0]:
            maps0[s.key] = mp
        else:
            res[sc].setdefault("map_diff_rel", []).append(float((mp - maps0[s.key]).abs().mean() / maps0[s.key].abs().mean()))
out = {str(k): {kk: round(float(np.mean([x for x in v if x is not None])), 4) for kk, v in d.items()} for k, d in res.items()}
print(json.dumps({"prior": name, "slices": len(slices), "t_frac": 0.4, "steps": 10, "by_scale": out}))
