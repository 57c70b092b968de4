"""Issue 18 research: line re-attribution of the KLIP maps of a cached MRI run (no new sampling).

Each cached window map ``klip[<window>]`` is re-attributed along the phase-encode axis
(``klip_med.score.reattribution``: each row's outside-body floor given back to the row's pixels above
it, every row's KL kept) into ``klip_ra[<window>]``; then both are scored as the default map is
(nine windows, a leave-one-patient-out null on the run's lesion-free slices, with the centring asked
for) and printed next to the simple baselines: localisation AUROC with per-patient bootstrap
intervals, paired differences to brightness and posterior std, the share of each map's KL that lies
outside the body, and the share of in-body KL on lesion pixels (lesion images).

    python examples/research_reattribution.py runs/mri4x_dev [--centring none slice]

Choose on a dev run only; a test run is read once, after the choice is frozen.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from klip_med.eval.cache import run_slices
from klip_med.eval.nulls import add_null_maps, method_name, null_models
from klip_med.eval.results import localisation_delta, with_ci
from klip_med.eval.summary import summarise
from klip_med.pipeline.settings import CALIBRATED_WINDOWS
from klip_med.score.reattribution import reattribute_lines

BASELINE_ROWS = ("posterior_std", "brightness", "brightness_dev", "centrality")


def _with_reattributed(entry, windows):
    body = torch.from_numpy(entry.body_mask.astype(bool))
    maps = dict(entry.maps)
    for w in windows:
        maps[f"klip_ra[{w}]"] = reattribute_lines(torch.from_numpy(entry.maps[f"klip[{w}]"].astype(np.float32)),
                                                  body).numpy()
    return replace(entry, maps=maps)


def _shares(entries, name):
    outside, lesion = [], []
    for e in entries:
        m, body = e.maps[name].astype(np.float64), e.body_mask.astype(bool)
        outside.append(m[~body].sum() / max(m.sum(), 1e-300))
        if e.label == 1:
            lesion.append(m[body & e.lesion.astype(bool)].sum() / max(m[body].sum(), 1e-300))
    return float(np.mean(outside)), float(np.mean(lesion)) if lesion else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a klip-med eval --out folder of an MRI run (windows t:0.1,0.2 ...)")
    parser.add_argument("--centring", nargs="+", default=["none"], choices=("none", "slice"))
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    b, windows = args.block_size, list(CALIBRATED_WINDOWS)
    entries = run_slices(args.run)
    raw_rows = [w for w in ("t:0.1,1", "full") if f"klip[{w}]" in entries[0].maps]
    entries = [_with_reattributed(e, windows + raw_rows) for e in entries]
    scored, z_name, names = entries, method_name(windows), []
    for prefix in ("klip", "klip_ra"):
        for centring in args.centring:
            models, blocks = null_models(entries, "lopo", windows, b, prefix=prefix, centring=centring)
            with_z = add_null_maps(entries, models, blocks, windows, b)
            name = f"{prefix} z ({centring})"
            names.append(name)
            scored = [replace(s, maps={**s.maps, name: z.maps[z_name]}) for s, z in zip(scored, with_z, strict=True)]
    methods, _ = summarise(scored, b, 5, args.bootstrap, 0)
    print(f"{args.run}: {len(entries)} images ({sum(e.label for e in entries)} with a lesion), "
          f"{len({e.patient for e in entries})} patients, {b}x{b} blocks")
    print("| map | localisation AUROC | minus brightness | minus posterior std | KL outside the body | "
          "in-body KL on the lesion |")
    print("|---|---|---|---|---|---|")
    for name in names + [f"{p}[{w}]" for w in raw_rows for p in ("klip", "klip_ra")] + list(BASELINE_ROWS):
        if name not in methods:
            continue
        shares = "| |"
        if "[" in name:
            out, les = _shares(entries, name)
            shares = f"| {out:.3f} | {les:.3f} |"
        m = methods[name]
        print(f"| {name} | {with_ci(m['localisation'] or {}, 'auroc')} | {localisation_delta(m, 'brightness')} | "
              f"{localisation_delta(m, 'posterior_std')} {shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
