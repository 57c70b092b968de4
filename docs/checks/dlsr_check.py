"""DLSR on real dev slices (ground truth standing in for the reconstruction): localisation AUROC
of the DLSR map vs AnoDDPM and brightness on tumour / inserted-shift slices, and the slice score.
usage: OMP_NUM_THREADS=1 python docs/checks/dlsr_check.py mri|ct [shift]"""
import json
import sys

import numpy as np
import torch

from klip_med.data.manifest import read_manifest
from klip_med.data.selection import select_slices
from klip_med.eval.companions import companion_dir
from klip_med.eval.dlsr import load_dlsr
from klip_med.eval.metrics import auroc, lesion_blocks, localisation
from klip_med.eval.prior_maps import anoddpm_map
from klip_med.priors import load
from klip_med.score.blocks import blocks_inside_mask, pool_blocks

torch.set_num_threads(1)
case = sys.argv[1]
shift = sys.argv[2] if len(sys.argv) > 2 else None
name, manifest = {"mri": ("mri-brain-flair-128", "data_manifests/lgg_flair_128.json"),
                  "ct": ("ct-abdomen-128", "data_manifests/ct_L067.json")}[case]
m = read_manifest(manifest, "/work/shared/data")
prior = load(name)
dlsr = load_dlsr(companion_dir(name, "dlsr"), prior)
kw = {"lesions": "inserted", "shift": shift, "pixel_spacing_mm": 1.875 if case == "mri" else None} if shift else {}
slices = select_slices(m, "dev", prior, max_patients=4 if case == "mri" else None, max_slices_per_patient=4, seed=0, **kw)
locs, scores = {"dlsr": [], "anoddpm": [], "brightness": []}, {"dlsr": [], "anoddpm": [], "brightness": []}
for s in slices:
    x = torch.from_numpy(s.image)
    maps = {"dlsr": dlsr.score_map(prior, x, torch.Generator().manual_seed(2))[0],
            "anoddpm": anoddpm_map(prior, x, torch.Generator().manual_seed(3), 0.25, 5)[0], "brightness": x}
    inside = blocks_inside_mask(torch.from_numpy(s.image > -0.9), 8).numpy()
    for k, mp in maps.items():
        b = pool_blocks(mp.float(), 8).densities.numpy()
        scores[k].append(float(np.sort(b[inside])[-5:].mean()))
        if s.label:
            loc = localisation(b, lesion_blocks(s.lesion, 8), inside)
            if loc.auroc is not None:
                locs[k].append(loc.auroc)
labels = [s.label for s in slices]
out = {"prior": name, "shift": shift, "images": len(slices), "ood": int(sum(labels)),
       "localisation_auroc_mean": {k: round(float(np.mean(v)), 3) for k, v in locs.items()},
       "slice_auroc": {k: round(auroc(v, labels), 3) for k, v in scores.items()}}
print(json.dumps(out))
