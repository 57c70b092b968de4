"""Research on cached benchmark runs (issue 8): which KLIP read-out localises lesions best?

Reads the per-slice cache of a ``klip-med eval`` run (maps per pixel, so nothing is sampled
again) and scores variants of the KLIP map at block level, next to posterior std and brightness:

- ``raw``: the block density of each window (and of unions of the fine windows: KL adds over steps);
- ``z_pos``: :class:`klip_med.calibration.NullModel` with ``position`` conditioning (log density
  z-scored against the same block of the in-distribution (ID) images);
- ``z_int``: the same with ``intensity`` conditioning (bins of posterior-mean block intensity);
- ``z_int_edge``: the same, bins of (intensity, distance to the body edge);
- ``stouffer``: position z of the nine fine windows combined (the default), and the same with
  binned conditioning on the distance to the body edge, on local texture (block std of the
  posterior mean) or on both;
- ``z_reg``: log density minus a gradient-boosted regression on (intensity, its block std,
  distance to the body edge, row, column) fitted on ID blocks, divided by the residual spread.

Every calibration uses ID slices only (tumour-free slices; for inserted-lesion CT the lesion-free
twin) and leaves the evaluated image's patient out (leave-one-patient-out, LOPO), so no OOD data
and no information about the evaluated patient is used. Also prints the per-window KL of lesion
blocks against the other in-body blocks of the OOD images (where in diffusion time the excess lives)
and, for inserted lesions, each map in the lesion's pixels against the same pixels of the
lesion-free twin (does the lesion raise it at all?).

    python examples/research_klip_variants.py runs/mri4x_dev --block-size 8
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from klip_med.calibration.fit import fit_null
from klip_med.eval.cache import run_slices
from klip_med.eval.metrics import lesion_blocks, localisation, patient_bootstrap
from klip_med.eval.nulls import cached_blocks as null_blocks
from klip_med.calibration.scoring import inside_blocks
from klip_med.eval.summary import block_maps
from klip_med.pipeline import CALIBRATED_WINDOWS

EPS = 1e-12


def fine_windows(names):
    out = []
    for n in names:
        if n.startswith("klip[t:"):
            lo, hi = (float(v) for v in n[len("klip[t:"):-1].split(","))
            if abs(hi - lo - 0.1) < 1e-6:
                out.append((lo, hi, n))
    return sorted(out)


def block_covariates(entry, block_size, inside):
    """(gh, gw, 5): posterior-mean block mean, its block std, distance of the block to the body edge
    (pixels), row and column of the block centre (pixels)."""
    mean = entry.images[2].astype(np.float32)
    h, w = mean.shape
    gh, gw = inside.shape
    m = mean[: gh * block_size, : gw * block_size].reshape(gh, block_size, gw, block_size)
    bmean, bstd = m.mean(axis=(1, 3)), m.std(axis=(1, 3))
    dist = ndimage.distance_transform_edt(entry.body_mask)
    d = dist[: gh * block_size, : gw * block_size].reshape(gh, block_size, gw, block_size).mean(axis=(1, 3))
    rows, cols = np.meshgrid(np.arange(gh) * block_size, np.arange(gw) * block_size, indexing="ij")
    return np.stack([bmean, bstd, d, rows, cols], axis=-1)


def binned_z(train_x, train_y, x, y, edges_per_dim):
    """z-score of y within the bin of x (quantile bins of each column of train_x, product grid)."""
    mu, sd = binned_moments(train_x, train_y, x, edges_per_dim)
    return (y - mu) / sd


def binned_moments(train_x, train_y, x, edges_per_dim):
    """Mean and std of train_y within the bin of each row of x (quantile bins of train_x's columns)."""
    if train_x.shape[1] == 0:
        return np.full(x.shape[0], train_y.mean()), np.full(x.shape[0], max(train_y.std(), 1e-3))
    edges = [np.quantile(train_x[:, k], np.linspace(0, 1, n + 1)[1:-1]) for k, n in enumerate(edges_per_dim)]

    def bin_index(values):
        idx = np.zeros(values.shape[0], dtype=np.int64)
        for k, e in enumerate(edges):
            idx = idx * (len(e) + 1) + np.searchsorted(e, values[:, k])
        return idx

    tb, xb = bin_index(train_x), bin_index(x)
    gmu, gsd = train_y.mean(), max(train_y.std(), 1e-3)
    mu = {b: train_y[tb == b].mean() for b in np.unique(tb)}
    sd = {b: max(train_y[tb == b].std(), 1e-3) for b in np.unique(tb)}
    return np.array([mu.get(b, gmu) for b in xb]), np.array([sd.get(b, gsd) for b in xb])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a klip-med eval --out folder")
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    b = args.block_size
    entries = run_slices(args.run, current_mask=False)
    ood = [e for e in entries if e.label == 1]
    idd = [e for e in entries if e.label == 0]
    print(f"{len(entries)} slices ({len(ood)} OOD, {len(idd)} ID), {len({e.patient for e in entries})} patients")
    names = list(entries[0].maps)
    fine = fine_windows(names)
    # unions of fine windows: KL adds over steps
    unions = {}
    for lo in (0.3, 0.5, 0.6, 0.7, 0.8):
        parts = [n for a, _, n in fine if a >= lo - 1e-6]
        if parts:
            unions[f"klip[t:{lo},1]*"] = parts

    inside = {e.key: inside_blocks(e.body_mask, b) for e in entries}
    lesion = {e.key: lesion_blocks(e.lesion, b) for e in ood}
    cov = {e.key: block_covariates(e, b, inside[e.key]) for e in entries}

    def covs(e):
        return {"intensity": cov[e.key][..., 0], "edge_distance": cov[e.key][..., 2]}

    def blocks_of(e, name):
        if name in unions:
            return sum(block_maps(e, n, b) for n in unions[name])
        return block_maps(e, name, b)

    results = {}

    def score(label, per_image):
        aurocs, pats = [], []
        for e in ood:
            loc = localisation(per_image[e.key], lesion[e.key], inside[e.key])
            if loc.auroc is not None:
                aurocs.append(loc.auroc)
                pats.append(e.patient)
        a = np.array(aurocs)
        ci = patient_bootstrap(lambda idx: float(a[idx].mean()), pats, args.n_boot, 0)
        results[label] = (a, pats)
        print(f"{label:42s} loc AUROC {a.mean():.3f} [{ci.low:.3f}, {ci.high:.3f}]  (n={a.size})")

    base = ["posterior_std", "brightness", "brightness_dev", "anoddpm"]
    for name in base:
        if name in names:
            score(name, {e.key: block_maps(e, name, b) for e in ood})
    klip_names = [n for n in names if n.startswith("klip[")] + list(unions)
    for name in klip_names:
        score(f"raw {name}", {e.key: blocks_of(e, name) for e in ood})

    # calibrated variants, LOPO over ID slices
    candidates = [n for n in klip_names if n in unions or n in ("klip[full]", "klip[t:0.3,1]", "klip[t:0.6,1]")]
    from sklearn.ensemble import HistGradientBoostingRegressor

    for name in candidates:
        id_blocks = {e.key: np.log(blocks_of(e, name) + EPS) for e in idd}
        out = {"z_pos": {}, "z_int": {}, "z_int_edge": {}, "z_reg": {}}
        for e in ood:
            others = [o for o in idd if o.patient != e.patient]
            dens = [blocks_of(o, name) for o in others]
            ints = [covs(o) for o in others]
            ins = [inside[o.key] for o in others]
            val = blocks_of(e, name)
            for kind, cond in (("z_pos", "position"), ("z_int", "intensity")):
                null = fit_null(dens, ints, ins, {}, "lopo", conditioning=cond)
                out[kind][e.key] = null.z_scores(val, covs(e))
            ys = np.concatenate([id_blocks[o.key][inside[o.key]] for o in others])
            xs = np.concatenate([cov[o.key][inside[o.key]] for o in others])
            x = cov[e.key].reshape(-1, 5)
            lv = np.log(val + EPS).reshape(-1)
            z2 = binned_z(xs[:, [0, 2]], ys, x[:, [0, 2]], lv, [6, 4]).reshape(val.shape)
            out["z_int_edge"][e.key] = z2
            reg = HistGradientBoostingRegressor(max_iter=100, max_leaf_nodes=15, random_state=0).fit(xs, ys)
            resid = ys - reg.predict(xs)
            out["z_reg"][e.key] = ((lv - reg.predict(x)) / resid.std()).reshape(val.shape)
        for kind, maps in out.items():
            score(f"{kind} {name}", maps)

    # Stouffer: position z-scores of the fine windows summed (no window chosen); without the first
    # window (t < 0.1, dominated by the sampler's deterministic last step) and with it
    if fine:
        for label, lo_min in (("stouffer t>=0.1", 0.1), ("stouffer all", 0.0), ("stouffer t>=0.3", 0.3)):
            parts = [n for a, _, n in fine if a >= lo_min - 1e-6]
            maps = {}
            for e in ood:
                others = [o for o in idd if o.patient != e.patient]
                total = 0.0
                for n in parts:
                    null = fit_null([blocks_of(o, n) for o in others], [covs(o) for o in others],
                                         [inside[o.key] for o in others], {}, "lopo", conditioning="position")
                    total = total + null.z_scores(blocks_of(e, n))
                maps[e.key] = total
            score(f"{label} ({len(parts)} windows)", maps)
        # the same combination with binned conditioning: distance to the body edge; local texture
        # (block std of the posterior mean: complex anatomy carries more KL); both
        parts = [n for a, _, n in fine if a >= 0.1 - 1e-6]
        for label, cols, bins in (("edge", [2], [8]), ("texture", [1], [8]), ("texture+edge", [1, 2], [5, 4])):
            maps = {}
            for e in ood:
                others = [o for o in idd if o.patient != e.patient]
                total = 0.0
                for n in parts:
                    ys = np.concatenate([np.log(blocks_of(o, n) + EPS)[inside[o.key]] for o in others])
                    xs = np.concatenate([cov[o.key][inside[o.key]] for o in others])
                    val = np.log(blocks_of(e, n) + EPS)
                    total = total + binned_z(xs[:, cols], ys, cov[e.key].reshape(-1, 5)[:, cols], val.reshape(-1),
                                             bins).reshape(val.shape)
                maps[e.key] = total
            score(f"stouffer-{label} t>=0.1 ({len(parts)} windows)", maps)

    # ID-only model selection: held-out (leave-one-patient-out) Gaussian log-likelihood of the ID blocks'
    # log densities under each null family, summed over the nine windows; no lesion label is used
    if fine:
        parts = [n for a, _, n in fine if a >= 0.1 - 1e-6]
        print("\nID-only: held-out log-likelihood per ID block (nats, higher = the null family explains healthy KL better)")
        for family in ("none", "position", "edge", "texture", "texture+edge", "intensity", "intensity+edge"):
            total, count = 0.0, 0
            for e in idd:
                others = [o for o in idd if o.patient != e.patient]
                ins = inside[e.key]
                for n in parts:
                    ys = np.concatenate([np.log(blocks_of(o, n) + EPS)[inside[o.key]] for o in others])
                    xs = np.concatenate([cov[o.key][inside[o.key]] for o in others])
                    val = np.log(blocks_of(e, n) + EPS)
                    if family == "position":
                        null = fit_null([blocks_of(o, n) for o in others], [covs(o) for o in others],
                                             [inside[o.key] for o in others], {}, "lopo", conditioning="position")
                        mu, sd = null.mean[0], null.std[0]
                    else:
                        cols = {"none": [], "edge": [2], "texture": [1], "texture+edge": [1, 2], "intensity": [0],
                                "intensity+edge": [0, 2]}[family]
                        bins = {"none": [], "edge": [8], "texture": [8], "texture+edge": [5, 4], "intensity": [10],
                                "intensity+edge": [6, 4]}[family]
                        mu, sd = binned_moments(xs[:, cols], ys, cov[e.key].reshape(-1, 5)[:, cols], bins)
                        mu, sd = mu.reshape(val.shape), sd.reshape(val.shape)
                    ll = -0.5 * ((val - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)
                    total += float(ll[ins].sum())
                    count += int(ins.sum())
            print(f"  {family:16s} {total / count:+.3f} nats per block-window")

    # is the null calibrated for a new patient? nested leave-one-patient-out on the ID slices
    if all(f"klip[{w}]" in names for w in CALIBRATED_WINDOWS):
        print("\nnull calibration on held-out patients (position, 9 windows): observed false-positive rate per block")
        blk = {e.key: null_blocks(e, CALIBRATED_WINDOWS, b) for e in idd}
        for mode in ("image", "patient"):
            hits = {0.01: [], 0.05: []}
            for p in sorted({e.patient for e in idd}):
                train = [e for e in idd if e.patient != p]
                d, c, m = zip(*(blk[e.key] for e in train), strict=True)
                null = fit_null(d, c, m, {}, "lopo", conditioning="position",
                                     groups=None if mode == "image" else [e.patient for e in train])
                for e in (e for e in idd if e.patient == p):
                    dd, cc, mm = blk[e.key]
                    z = null.z_scores(dd, cc)[mm]
                    for a in hits:
                        hits[a].extend((z >= null.z_threshold(a)).tolist())
            rates = ", ".join(f"nominal {a}: {np.mean(h):.4f}" for a, h in hits.items())
            print(f"  reference leaves one {mode} out: {rates} ({len(hits[0.01])} blocks)")

    # where in time the excess lives
    if fine:
        print("\nper-window mean block density (nats/pixel), OOD images: lesion blocks vs other in-body blocks")
        for _lo, _hi, n in fine:
            les, oth = [], []
            for e in ood:
                m = block_maps(e, n, b)
                les.append(m[lesion[e.key] & inside[e.key]])
                oth.append(m[~lesion[e.key] & inside[e.key]])
            les, oth = np.concatenate(les), np.concatenate(oth)
            print(f"  {n:16s} lesion {les.mean():.3e}  other {oth.mean():.3e}  ratio {les.mean() / oth.mean():.2f}")

    # inserted lesions: does the lesion raise KL over the same pixels of its lesion-free twin?
    twins = {e.key: e for e in idd}
    pairs = [(e, twins[e.key.removesuffix("+lesion")]) for e in ood
             if e.key.endswith("+lesion") and e.key.removesuffix("+lesion") in twins]
    if pairs:
        print(f"\nmatched twins ({len(pairs)} pairs): map in the lesion pixels of the lesion slice / the same pixels "
              "of its lesion-free twin")
        shown = [n for n in names if n.startswith("klip[")] + [n for n in ("posterior_std", "anoddpm") if n in names]
        for n in shown:
            ratio = np.array([o.maps[n][o.lesion].mean() / max(float(t.maps[n][o.lesion].mean()), EPS)
                              for o, t in pairs])
            print(f"  {n:18s} mean ratio {ratio.mean():.2f}  median {np.median(ratio):.2f}  "
                  f"pairs above 1: {(ratio > 1).sum()}/{len(ratio)}")


if __name__ == "__main__":
    main()
