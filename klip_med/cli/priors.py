"""``klip-med priors``: list the shipped priors and their model cards."""

from __future__ import annotations

import argparse


def run_command(args: argparse.Namespace) -> int:
    from klip_med.priors import available, describe, model_card

    names = available()
    if not names:
        print("no shipped priors installed")
        return 0
    for name in names:
        config = describe(name)
        training = config.training
        print(f"{name}: {config.modality} {config.image_size}x{config.image_size}, "
              f"{training.get('steps_trained', '?')} steps, final loss {training.get('final_loss', '?')}, "
              f"trained on {training.get('manifest', '?')} ({training.get('device', '?')})")
        if args.cards:
            print(model_card(name))
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``priors`` on the ``klip-med`` subparsers."""
    priors = sub.add_parser("priors", help="list the shipped priors", description="List the shipped priors.")
    priors.add_argument("--cards", action="store_true", help="print each model card")
    priors.set_defaults(run=run_command)
    return priors
