"""``klip-med verify``: check the KLIP estimator on this install against a closed-form Gaussian posterior."""

from __future__ import annotations

import argparse
import json
import time


def run_command(args: argparse.Namespace) -> int:
    from klip_med.priors.gaussian_case import verify_report

    steps = tuple(int(s) for s in args.steps.split(","))
    start = time.perf_counter()
    report = verify_report(
        step_counts=steps, n_samples=args.samples, seed=args.seed, train_steps=args.train_steps
    )
    report["seconds"] = round(time.perf_counter() - start, 2)
    print(f"closed-form KL(posterior || prior): {report['closed_form_kl_nats']:.3f} nats")
    for row in report["runs"]:
        print(
            f"  {row['steps']:>5} steps: chain KL {row['chain_kl_nats']:.3f} "
            f"+- {row['standard_error_nats']:.3f} nats (ratio {row['ratio_to_closed_form']:.3f}), "
            f"worst 4x4 block off by {100 * row['max_block_relative_error']:.1f}%"
        )
    print(
        f"({report['samples']} posterior samples, schedule of {report['train_steps']} "
        f"timesteps, {report['seconds']} s)"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``verify`` on the ``klip-med`` subparsers."""
    verify = sub.add_parser(
        "verify",
        help="check the KLIP estimator against a closed-form Gaussian posterior",
        description=(
            "Sample the exact posterior of a 16x16 Gaussian prior under a block-local linear "
            "measurement and compare the accumulated chain KL (total and per 4x4 block) with the "
            "closed-form KL(posterior || prior). The ratio tends to 1 as steps grow."
        ),
    )
    verify.add_argument("--steps", default="250,1000", help="comma-separated step counts")
    verify.add_argument("--samples", type=int, default=128, help="posterior samples")
    verify.add_argument("--seed", type=int, default=1)
    verify.add_argument(
        "--train-steps",
        type=int,
        default=1000,
        help="timesteps of the VP schedule (same SDE, finer discretisation when larger)",
    )
    verify.add_argument("--json", help="also write the report to this JSON file")
    verify.set_defaults(run=run_command)
    return verify
