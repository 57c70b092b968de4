"""Figure: the default KLIP map (null z-score, 9 windows) next to posterior std, for a few OOD images
of a cached ``klip-med eval`` run. For each image it shows: the truth with the lesion outline,
the measurement-domain reconstruction, the posterior std, the raw KLIP over ``t`` in [0.1, 1] (nats),
and KLIP z; with ``--null FILE`` a last column, KLIP z under that null model (a variant to compare:
e.g. a prior-predictive null for CT, the expected map of the operator's geometry without data).

Each image's null model is fitted on the lesion-free slices of the *other* patients of the run
(leave-one-patient-out), as in ``klip-med eval --null lopo``. Images are chosen evenly through the
OOD images, not by how well they look.

    python examples/figure_default_maps.py runs/mri4x_dev docs/figures/mri_dev_default_maps.png --n 4
    python examples/figure_default_maps.py runs/ct60_dev ct.png --null runs/null_ct60_prior16_position.json \
        --null-label "prior-predictive null"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from klip_med.eval.cache import run_slices  # noqa: E402
from klip_med.eval.metrics import lesion_blocks, localisation  # noqa: E402
from klip_med.eval.nulls import add_null_maps, method_name, null_models  # noqa: E402
from klip_med.calibration.null_model import NullModel  # noqa: E402
from klip_med.calibration.scoring import inside_blocks  # noqa: E402
from klip_med.pipeline import CALIBRATED_WINDOWS  # noqa: E402
from klip_med.score.blocks import pool_blocks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a klip-med eval --out folder whose windows include t:0.1,0.2 ... t:0.9,1")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--n", type=int, default=4, help="OOD images shown (evenly spaced)")
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--null", help="a null model file: adds a column, KLIP z under it")
    ap.add_argument("--null-label", default="other null", help="that column's title")
    args = ap.parse_args()
    b = args.block_size
    entries = run_slices(args.run, current_mask=False)
    models, blocks = null_models(entries, "lopo", CALIBRATED_WINDOWS, b)
    entries = add_null_maps(entries, models, blocks, CALIBRATED_WINDOWS, b)
    zname = method_name(CALIBRATED_WINDOWS)
    variant = {}
    if args.null:
        vmodels, vblocks = null_models(entries, NullModel.load(args.null), CALIBRATED_WINDOWS, b)
        variant = {e.key: e.maps[zname] for e in add_null_maps(entries, vmodels, vblocks, CALIBRATED_WINDOWS, b)}
    ood = [e for e in entries if e.label == 1]
    picks = [ood[i] for i in np.linspace(0, len(ood) - 1, min(args.n, len(ood))).round().astype(int)]
    cols = ["truth (lesion outline)", "zero-filled / FBP", "posterior std", "KLIP t:0.1,1 (nats/px)", "KLIP z (default)"]
    if variant:
        cols.append(f"KLIP z ({args.null_label})")
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(3.0 * len(cols), 3.0 * len(picks)), squeeze=False)
    for r, e in enumerate(picks):
        raw = sum(e.maps[f"klip[{w}]"] for w in CALIBRATED_WINDOWS)
        inside = inside_blocks(e.body_mask, b)
        lesion = lesion_blocks(e.lesion, b)
        aucs = {}
        maps = [("posterior_std", e.maps["posterior_std"]), ("raw", raw), ("z", e.maps[zname])]
        if variant:
            maps.append(("variant", variant[e.key]))
        for name, m in maps:
            blocks = pool_blocks(torch.from_numpy(np.asarray(m, np.float32)), b).densities.numpy()
            aucs[name] = localisation(blocks, lesion, inside).auroc
        panels = [(e.images[0], "gray", None), (e.images[1], "gray", None),
                  (e.maps["posterior_std"], "magma", aucs["posterior_std"]), (raw, "magma", aucs["raw"]),
                  (np.where(e.body_mask, e.maps[zname], np.nan), "coolwarm", aucs["z"])]
        if variant:
            panels.append((np.where(e.body_mask, variant[e.key], np.nan), "coolwarm", aucs["variant"]))
        for c, (img, cmap, auc) in enumerate(panels):
            ax = axes[r, c]
            if cmap == "coolwarm":
                ax.imshow(e.images[0], cmap="gray")
                ax.imshow(img, cmap=cmap, vmin=-4, vmax=4, alpha=0.75)
            else:
                ax.imshow(img, cmap=cmap)
            ax.contour(e.lesion.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            title = cols[c] if r == 0 else ""
            if auc is not None:
                title = (title + "\n" if title else "") + f"block AUROC {auc:.2f}"
            ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(e.key.split("/")[-1], fontsize=7)
    fig.suptitle(f"{Path(args.run).name}: default KLIP z (null: other patients' lesion-free slices) vs posterior std",
                 fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
