"""A cohort for `klip-med batch` made of the bundled MRI case: N copies of the demo's FLAIR slice
(TCGA-LGG, with its tumour mask and the patient's MR scale) as .npz inputs, and the list file.

    python examples/batch_bundled_case.py --copies 4 --out cohort/          # --slices 16: 16-slice volumes
    klip-med batch --inputs cohort/inputs.txt --physics mri:accel=4,center=0.08,noise=0.01 \
        --prior mri-brain-flair-128 --samples 4 --steps 50 --out cohort-out/ --engine ray --workers 2

Every copy gives the outputs `klip-med demo` gives (same slice, physics, prior, settings and seed;
the shipped null model applies, so OUT/index.jsonl carries p-values): a throughput benchmark whose
series all cost the same. With `--slices N` each input is a volume of N copies of the slice (for
`--slice-batch` on a GPU). docs/batch.md has the numbers measured with it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from klip_med.pipeline.demo import case_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="how many series (default 4)")
    parser.add_argument("--slices", type=int, default=1, help="slices per volume (default 1)")
    parser.add_argument("--out", default="cohort", help="folder for the .npz inputs and inputs.txt (default cohort/)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = json.loads(case_file("lgg_flair_demo.json").read_text(encoding="utf-8"))
    with np.load(case_file("lgg_flair_demo.npz")) as data:
        stack = (args.slices, 1, 1)
        arrays = {"image": np.tile(data["flair"].astype(np.float32), stack), "mask": np.tile(data["mask"].astype(bool), stack),
                  "mr_scale": float(data["volume_mr_scale"]), "modality": "MR",
                  "pixel_spacing_mm": float(info["pixel_spacing_mm_nominal"])}
    names = []
    for k in range(args.copies):
        names.append(f"{info['patient']}_copy{k:03d}.npz")
        np.savez(out / names[-1], **arrays)
    (out / "inputs.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    print(f"wrote {args.copies} inputs and {out / 'inputs.txt'}; done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
