"""The ``klip-med`` command: one module per subcommand, the shared flags in :mod:`klip_med.cli.common`.

Subcommands:
    demo     a bundled real case (brain MRI with a tumour, or abdominal CT with an inserted lesion)
             undersampled, reconstructed with a shipped prior, scored, written as PNG/NIfTI/DICOM
    run      the same for your own DICOM series / NIfTI / .npz volume (slice by slice, resumable)
    batch    run over many volumes (a list or a data manifest), locally or on a Ray cluster
    verify   prove the KLIP estimator on this install against a closed-form Gaussian case
    manifest build a data manifest from your own DICOM folders / NIfTI files (splits by patient)
    train    train a diffusion prior on a data manifest (resumable)
    train-baseline  train the companion model of the dlsr / diffguard baseline (CPU)
    priors   list the shipped priors and their model cards
    evaluate-prior   measure a prior on held-out healthy slices (numbers for its model card)
    calibrate  fit a null model on in-distribution data: KLIP z-scores, p-values, a calibrated SEG threshold
    bench    time posterior sampling with KLIP: overhead, memory, deepinv and stored-trajectory comparisons

Exit codes:
    0    success
    1    internal error (a bug: the traceback is printed), or the operating system refused
         (disk full, permission denied: one line)
    2    user error: a bad argument, a missing / unreadable input, an unknown prior, a malformed
         physics string, an output folder that is a file, ... (one line naming the problem;
         ``--debug`` shows the traceback). argparse's own usage errors exit 2 too.
    130  interrupted (Ctrl-C); ``run`` resumes where it stopped when rerun with the same arguments
"""

from __future__ import annotations

import argparse
import sys
import traceback

from klip_med import __version__
from klip_med.cli import batch, bench, calibrate, demo, evaluate_prior, export_bundle, priors, run, train, verify
from klip_med.cli import manifest as manifest_command
from klip_med.cli import train_baseline
from klip_med.cli import eval as eval_command
from klip_med.errors import KLIPMedError

COMMANDS = (demo, run, batch, verify, manifest_command, train, train_baseline, evaluate_prior, priors, eval_command,
            calibrate, bench, export_bundle)
"""One module per command, in the order ``klip-med --help`` lists them; each has ``add_parser``."""


def build_parser() -> argparse.ArgumentParser:
    """The ``klip-med`` argument parser with every command registered."""
    parser = argparse.ArgumentParser(
        prog="klip-med",
        description="Diffusion posterior reconstruction of CT / MRI with KLIP out-of-distribution maps.",
        epilog="Start with `klip-med demo`; `klip-med COMMAND --help` for each command. Exit codes: 0 ok, "
               "1 internal error, 2 user error (one line; --debug for the traceback), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"klip-med {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KLIPMedError as exc:
        if args.debug:
            raise
        print(f"klip-med: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("klip-med: interrupted (rerun the same command to resume a run)", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        print(f"klip-med: error: {exc}", file=sys.stderr)
        return 1
    except Exception:
        if args.debug:
            raise
        traceback.print_exc()
        print("klip-med: internal error (a bug: please report it with the traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
