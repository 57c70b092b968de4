"""Issue 18 research: the KLIP read-outs of one sampling pass against each other and the simple baselines.

Reads a ``klip-med eval --readouts denoised tstat`` run (no new sampling) and prints one table row per
read-out: localisation AUROC with its per-patient bootstrap interval, and the paired difference to
brightness and to posterior std (per-patient bootstrap). The calibrated rows are the nine-window
z-scores of each read-out under a leave-one-patient-out null fitted on the run's lesion-free slices
(the default map's recipe applied to the read-out):

- ``klip z``: the default map (the KL split as the data-consistency correction lands);
- ``klip_dn z``: the same KL split by the prior's denoiser (``klip_med.sampling.attribution``);
- ``klip_t z``: the per-pixel t-statistic over the posterior samples.

    python examples/research_readouts.py runs/mri4x_dev_readouts

Choose on a dev run only; a test run is read once, after the choice is frozen.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from klip_med.eval.cache import run_slices
from klip_med.eval.nulls import add_null_maps, method_name, null_models
from klip_med.eval.results import localisation_delta, with_ci
from klip_med.eval.summary import summarise
from klip_med.pipeline.settings import CALIBRATED_WINDOWS

READOUT_PREFIXES = ("klip", "klip_dn", "klip_t")
RAW_ROWS = ("klip[t:0.1,1]", "klip_dn[t:0.1,1]", "klip_t[t:0.1,1]", "klip[full]", "klip_dn[full]")
BASELINE_ROWS = ("posterior_std", "brightness", "brightness_dev", "centrality", "residual", "anoddpm", "cfs")


def _row(name: str, method: dict) -> str:
    return (f"| {name} | {with_ci(method['localisation'] or {}, 'auroc')} | "
            f"{localisation_delta(method, 'brightness')} | {localisation_delta(method, 'posterior_std')} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a klip-med eval --out folder made with --readouts denoised tstat")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    entries = run_slices(args.run)
    b, windows = args.block_size, list(CALIBRATED_WINDOWS)
    scored = entries
    z_name = method_name(windows)
    for prefix in READOUT_PREFIXES:
        models, blocks = null_models(entries, "lopo", windows, b, prefix=prefix)
        with_z = add_null_maps(entries, models, blocks, windows, b)
        scored = [replace(s, maps={**s.maps, f"{prefix} z": z.maps[z_name]}) for s, z in zip(scored, with_z,
                                                                                             strict=True)]
    methods, _ = summarise(scored, b, 5, args.bootstrap, 0)
    n_ood = sum(e.label for e in entries)
    print(f"{args.run}: {len(entries)} images ({n_ood} with a lesion), "
          f"{len({e.patient for e in entries})} patients, {b}x{b} blocks")
    print("| map | localisation AUROC | minus brightness | minus posterior std |")
    print("|---|---|---|---|")
    for name in [f"{p} z" for p in READOUT_PREFIXES] + list(RAW_ROWS) + list(BASELINE_ROWS):
        if name in methods:
            print(_row(name, methods[name]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
