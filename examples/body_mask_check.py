"""Check the body mask on every real slice of a split, and draw the failures.

The body mask decides which blocks are "inside the body": the image score, the localisation AUROC and
every false-positive rate depend on it. This script runs :func:`klip_med.data.masks.body_mask` (the
outline rule) and the first round's rule (Otsu, largest component, holes filled) on every slice of a
manifest split with enough body, in the prior's units, and on the posterior means cached by a
``klip-med eval`` run if one is given. A mask fails when it leaves out more than 2% of the bright
tissue (pixels above the slice's Otsu threshold) or takes in more than 2% of the background that
touches the image border (pixels within 3% of the dark end of the range).

    python examples/body_mask_check.py --manifest data_manifests/lgg_flair_128.json --data-root ../shared/data \\
        --prior mri-brain-flair-128 --split dev --eval-run runs/mri4x_dev --figure docs/figures/body_mask_check.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from klip_med import priors
from klip_med.data.manifest import read_manifest
from klip_med.data.masks import body_fraction, body_mask, otsu_threshold

COVERAGE_MIN = 0.98
LEAK_MAX = 0.02


def first_round_mask(image: np.ndarray) -> np.ndarray:
    """The rule the outline rule replaced: Otsu threshold, largest component, holes filled."""
    mask = image > otsu_threshold(image)
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == 1 + int(np.argmax(ndimage.sum(mask, labels, range(1, n + 1))))
    return ndimage.binary_fill_holes(mask)


def check(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(coverage of the bright tissue, fraction of the border-connected background taken in)."""
    lo, hi = np.percentile(image, [1, 99])
    tissue = image > otsu_threshold(image)
    labels, _ = ndimage.label(image < lo + 0.03 * (hi - lo))
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    outside = np.isin(labels, list(border))
    return float((mask & tissue).sum() / max(tissue.sum(), 1)), float((mask & outside).sum() / max(outside.sum(), 1))


def slices_of(args, prior) -> list[tuple[str, np.ndarray]]:
    """(name, image in prior units) of every slice of the split with body fraction >= 0.3."""
    manifest = read_manifest(args.manifest, args.data_root)
    rule = prior.config.intensity
    out = []
    for item in manifest.split(args.split):
        with np.load(item.path) as data:
            volume = data[manifest.array_key].astype(np.float32)
        scale = rule.mr_scale(volume) if rule.kind == "mr-percentile" else None
        model = rule.to_model(volume, scale)
        for i in item.slice_indices(volume.shape[0]):
            if body_fraction(model[i]) >= 0.3:
                out.append((f"{item.relative}[{i}]", model[i]))
    return out


def cached_means(run: Path) -> list[tuple[str, np.ndarray]]:
    """(key, posterior mean) of every slice of a `klip-med eval` run (those its results.json lists)."""
    from klip_med.eval.cache import run_slices

    return [(e.key + " (posterior mean)", np.asarray(e.images[2], np.float16).astype(np.float32))
            for e in run_slices(run, current_mask=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--prior", required=True, help="its intensity rule maps the slices to prior units")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--eval-run", type=Path, help="also check the posterior means cached by this eval run")
    parser.add_argument("--figure", type=Path, help="PNG of the failures (or of the worst slices when none fails)")
    args = parser.parse_args(argv)
    prior = priors.load(args.prior)
    images = slices_of(args, prior) + (cached_means(args.eval_run) if args.eval_run else [])
    rows = []
    for name, image in images:
        for rule, mask in (("outline", body_mask(image)), ("first round", first_round_mask(image))):
            coverage, leak = check(image, mask)
            rows.append((name, rule, coverage, leak, coverage < COVERAGE_MIN or leak > LEAK_MAX, mask, image))
    for rule in ("outline", "first round"):
        mine = [r for r in rows if r[1] == rule]
        for kind in ("", " (posterior mean)"):
            part = [r for r in mine if r[0].endswith(" (posterior mean)") == bool(kind)]
            if part:
                print(f"{rule:<12} {'posterior means' if kind else 'ground truth':<15}: {sum(r[4] for r in part)} "
                      f"of {len(part)} slices fail (coverage < {COVERAGE_MIN} or background > {LEAK_MAX}); "
                      f"coverage 5th percentile {np.percentile([r[2] for r in part], 5):.3f}")
    if args.figure:
        outline = [r for r in rows if r[1] == "outline"]
        failed = [r for r in outline if r[4]] or sorted(outline, key=lambda r: r[2] - r[3])[:4]
        old_failed = [r for r in rows if r[1] == "first round" and r[4]][:4]
        shown = failed[:8] + old_failed
        fig = Figure(figsize=(3.2 * min(len(shown), 6), 3.4 * ((len(shown) + 5) // 6)), dpi=80)
        FigureCanvasAgg(fig)
        for k, (name, rule, coverage, leak, bad, mask, image) in enumerate(shown):
            ax = fig.add_subplot((len(shown) + 5) // 6, min(len(shown), 6), k + 1)
            ax.imshow(image, cmap="gray")
            ax.contour(mask.astype(float), levels=[0.5], colors="lime" if rule == "outline" else "red", linewidths=0.8)
            ax.set_title(f"{rule}{' FAILS' if bad else ''}\n{name.split('/')[-1][:34]}\ncov {coverage:.2f} bg {leak:.3f}",
                         fontsize=7)
            ax.set_axis_off()
        fig.tight_layout()
        fig.savefig(args.figure)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
