"""Write the project's data manifests from the shared data folder (run once; outputs are committed).

    python data_manifests/build_manifests.py --data-root ../shared/data

Splits are fixed by the seeds below so that rerunning gives the same files byte for byte:

- ``lgg_flair_128.json``: 81 LGG patients. 30 held out entirely (never trained on), stratified by
  institution: 15 ``dev`` (choose settings here) and 15 ``test`` (report here). The 51 ``train``
  patients contribute only their tumour-free slices (mask empty). Held-out items list all slices,
  with ``lesion_slices`` in their labels.
- ``ct_L067.json``: one patient, 560 slices pelvis (0) to lung bases (559), 0.8 mm apart. Four
  held-out blocks of 20 slices spread along the body (pelvis, lower abdomen, kidneys / lower liver,
  liver), each with 10-slice gaps to the training slices on both sides; two blocks ``dev``, two
  ``test``. Everything else is ``train``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from klip_med.data.manifest import SCHEMA, VERSION, file_sha256

HERE = Path(__file__).resolve().parent
LGG_SEED = 20261122
LGG_DEV, LGG_TEST = 15, 15
CT_HELDOUT_BLOCKS = {  # [start, stop) slice ranges, 0 = pelvis
    "dev": [(55, 75), (370, 390)],
    "test": [(195, 215), (470, 490)],
}
CT_GAP = 10
LGG_LICENCE = (
    "CC BY-NC-SA 4.0 (TCGA-LGG FLAIR, 'LGG MRI segmentation', Buda et al. 2019; Mazurowski et al. 2017); "
    "non-commercial research use; derived priors carry the same terms"
)
CT_LICENCE = (
    "2016 NIH-AAPM-Mayo Low Dose CT Grand Challenge, patient L067: internal research use only, "
    "do not redistribute pixels"
)


def lgg_manifest(root: Path) -> dict:
    index = json.loads((root / "lgg_flair_128" / "index.json").read_text())
    rng = np.random.default_rng(LGG_SEED)
    by_inst: dict[str, list[str]] = {}
    for row in index:
        by_inst.setdefault(row["institution"], []).append(row["patient"])
    # Stratify by institution: each contributes held-out patients in proportion to its size
    # (largest remainders get the leftover places), drawn at random within the institution.
    quota = LGG_DEV + LGG_TEST
    shares = {inst: len(p) * quota / len(index) for inst, p in by_inst.items()}
    counts = {inst: int(np.floor(s)) for inst, s in shares.items()}
    for inst in sorted(shares, key=lambda i: (counts[i] - shares[i], i)):
        if sum(counts.values()) >= quota:
            break
        counts[inst] += 1
    heldout: list[str] = []
    for inst in sorted(by_inst):
        pts = sorted(by_inst[inst])
        heldout.extend(pts[i] for i in rng.permutation(len(pts))[: counts[inst]])
    heldout_sorted = [heldout[i] for i in rng.permutation(len(heldout))]
    dev = set(heldout_sorted[:LGG_DEV])
    items = []
    for row in sorted(index, key=lambda r: r["patient"]):
        patient = row["patient"]
        rel = f"lgg_flair_128/{patient}.npz"
        with np.load(root / rel) as data:
            lesion = data["mask"].reshape(data["mask"].shape[0], -1).any(axis=1)
        lesion_slices = [int(i) for i in np.flatnonzero(lesion)]
        labels = {"patient": patient, "institution": row["institution"], "lesion_slices": lesion_slices}
        if patient in heldout:
            split, slices = ("dev" if patient in dev else "test"), "all"
        else:
            split = "train"
            slices = [int(i) for i in np.flatnonzero(~lesion)]
        items.append({"file": rel, "sha256": file_sha256(root / rel), "split": split,
                      "slices": slices, "labels": labels})
    return {
        "schema": SCHEMA, "version": VERSION, "name": "lgg-flair-128", "modality": "MR",
        "description": (
            "LGG FLAIR 128x128. train: tumour-free slices of 51 patients; dev / test: all slices of "
            "15 + 15 held-out patients (never trained on), stratified by institution."
        ),
        "licence": LGG_LICENCE, "array_key": "flair", "mask_key": "mask",
        "created_by": "data_manifests/build_manifests.py", "items": items,
    }


def ct_manifest(root: Path) -> dict:
    rel = "ct_L067/L067_full1mm_128.npz"
    with np.load(root / rel) as data:
        n = data["hu"].shape[0]
    excluded = np.zeros(n, dtype=bool)
    items = []
    for split, blocks in CT_HELDOUT_BLOCKS.items():
        for start, stop in blocks:
            excluded[max(0, start - CT_GAP): min(n, stop + CT_GAP)] = True
            items.append({"file": rel, "sha256": file_sha256(root / rel), "split": split,
                          "slices": {"start": start, "stop": stop},
                          "labels": {"patient": "L067", "block": f"{start}-{stop}"}})
    train = [int(i) for i in np.flatnonzero(~excluded)]
    items.insert(0, {"file": rel, "sha256": file_sha256(root / rel), "split": "train", "slices": train,
                     "labels": {"patient": "L067"}})
    return {
        "schema": SCHEMA, "version": VERSION, "name": "ct-L067-128", "modality": "CT",
        "description": (
            "L067 abdominal CT, 128x128 (2.656 mm pixels), HU. Four held-out 20-slice blocks from pelvis "
            f"to liver with {CT_GAP}-slice gaps to training; dev {CT_HELDOUT_BLOCKS['dev']}, "
            f"test {CT_HELDOUT_BLOCKS['test']}."
        ),
        "licence": CT_LICENCE, "array_key": "hu", "created_by": "data_manifests/build_manifests.py",
        "items": items,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    args = parser.parse_args()
    for name, build in [("lgg_flair_128.json", lgg_manifest), ("ct_L067.json", ct_manifest)]:
        manifest = build(args.data_root.resolve())
        (HERE / name).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {HERE / name} ({len(manifest['items'])} items)")


if __name__ == "__main__":
    main()
