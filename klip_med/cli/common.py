"""What several ``klip-med`` commands share: the sampler and scoring flags (spelled the same in
every command), their checks, and the list of outputs a run prints.

Flags that mean the same thing have one spelling everywhere: ``--samples``, ``--steps``,
``--sampler``, ``--seed``, ``--normalization``, ``--zeta`` (DPS), ``--eta``, ``--gamma``,
``--cg-iters`` (the fast sampler), ``--windows`` (one or more, also
repeatable), ``--block-size``, ``--device``. Older spellings (``--window`` repeated, ``--block``,
``--block-sizes``) still work and print a deprecation line on stderr.

Heavy imports (torch and what needs it) stay inside the functions: ``klip-med --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from klip_med.errors import KLIPMedError, expect

RUN_DEFAULTS = {"samples": 4, "steps": 50, "sampler": "fast", "seed": 0, "block_size": 8,
                "normalization": "transition", "dps_zeta": 0.3, "dds_eta": 0.85, "dds_gamma": 1.0, "cg_iters": 5}
"""KLIPSettings' defaults, written out so ``--help`` needs no torch import (a test keeps them equal)."""
NORMALIZATIONS = ("transition", "sde", "paper")
"""``--normalization`` choices (:data:`klip_med.score.NORMALIZATIONS`, kept here for a fast ``--help``)."""
SETTING_FLAGS = ("samples", "steps", "sampler", "seed", "normalization", "dps_zeta", "dds_eta", "dds_gamma", "cg_iters")


class Deprecated(argparse.Action):
    """An old spelling of a flag: stores into the new flag's destination (``append`` / ``extend``
    to a list, or a plain value) and prints one deprecation line naming the new spelling."""

    def __init__(self, option_strings, dest, new: str, mode: str = "store", **kwargs):
        self.new, self.mode = new, mode
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"klip-med: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        if self.mode == "store":
            setattr(namespace, self.dest, values)
            return
        items = list(getattr(namespace, self.dest) or [])
        items += values if isinstance(values, list) else [values]
        setattr(namespace, self.dest, items)


def add_windows_flag(group, help_text: str) -> None:
    """``--windows W [W ...]`` (repeatable, values accumulate) and the deprecated ``--window W``."""
    group.add_argument("--windows", nargs="+", action="extend", metavar="WINDOW", help=help_text)
    group.add_argument("--window", dest="windows", action=Deprecated, new="--windows", mode="extend",
                       help=argparse.SUPPRESS)


def add_block_size_flag(group, default: int | None, help_text: str, type_=int) -> None:
    """``--block-size`` and the deprecated ``--block``."""
    group.add_argument("--block-size", type=type_, default=default, help=help_text)
    group.add_argument("--block", dest="block_size", type=type_, action=Deprecated, new="--block-size",
                       help=argparse.SUPPRESS)


def add_sampler_flags(parser: argparse.ArgumentParser, defaults: dict, outputs: bool = True,
                      progress: bool = True) -> argparse._ArgumentGroup:
    """Sampler flags of every command that samples (and ``--device``); ``outputs`` adds --threshold and
    --null, ``progress`` adds --no-progress.

    Values left unset are None (the command's own defaults apply: :func:`settings_from_args`).
    """
    group = parser.add_argument_group("sampling and scoring")
    group.add_argument("--samples", type=int, help=f"posterior samples per slice (default {defaults['samples']})")
    group.add_argument("--steps", type=int, help=f"sampling steps (default {defaults['steps']})")
    group.add_argument("--sampler", choices=["fast", "dps"],
                       help="fast: DDS, 1 network call per step; dps: backprop through the network per step "
                            f"(default {defaults['sampler']})")
    group.add_argument("--seed", type=int, help=f"seeds the measurement and the sampler (default {defaults['seed']})")
    group.add_argument("--normalization", choices=NORMALIZATIONS,
                       help="KL normalisation: transition (exact nats of each step's Gaussian kernels), sde "
                            "(g(t)^2 dt, for deterministic samplers) or paper (the KLIP paper's) "
                            f"(default {defaults.get('normalization', 'transition')})")
    add_sampler_parameter_flags(group, defaults)
    if outputs:
        add_output_flags(group)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return group


def add_sampler_parameter_flags(group, defaults: dict) -> None:
    """``--zeta`` (DPS) and ``--eta``, ``--gamma``, ``--cg-iters`` (the fast sampler); None when unset."""
    group.add_argument("--zeta", dest="dps_zeta", type=float,
                       help=f"DPS step size (--sampler dps only; default {defaults.get('dps_zeta', 0.3)})")
    group.add_argument("--eta", dest="dds_eta", type=float,
                       help=f"DDIM stochasticity of the fast sampler, 0..1 (default {defaults.get('dds_eta', 0.85)})")
    group.add_argument("--gamma", dest="dds_gamma", type=float,
                       help=f"data weight of the fast sampler's proximal step (default {defaults.get('dds_gamma', 1.0)})")
    group.add_argument("--cg-iters", dest="cg_iters", type=int,
                       help=f"conjugate-gradient iterations per step of the fast sampler "
                            f"(default {defaults.get('cg_iters', 5)})")


def add_output_flags(group: argparse._ArgumentGroup) -> None:
    """``--threshold`` and ``--null`` (commands that write an output set)."""
    group.add_argument("--threshold", default="auto",
                       help="OOD mask (SEG) rule. With a null model: 'fwer:A' = no flag in a healthy volume with "
                            "probability 1-A (family-wise over the input; 'fwer-slice:A' per slice), 'fdr:Q' = "
                            "Benjamini-Hochberg at rate Q ('fdr-slice:Q'), 'fpr:A' = per block. Uncalibrated: 'pNN' "
                            "(NN-th percentile of the volume's in-body blocks) or nats per pixel. Default auto: "
                            "fwer:0.05 with a null model; without one no SEG is written")
    group.add_argument("--allow-calibration-overlap", action="store_true",
                       help="score an input although the null model was fitted on some of its slices (refused "
                            "otherwise: its p-values would be too small there)")
    group.add_argument("--null", default="auto",
                       help="null model of the first window: a JSON file from `klip-med calibrate`, 'auto' (one "
                            "shipped with the prior for exactly these physics and settings, if any) or 'none' "
                            "(default auto)")


def settings_from_args(args: argparse.Namespace, defaults: dict):
    """KLIPSettings from the shared sampler flags (windows parsed later, once the prior is known)."""
    from klip_med.pipeline.settings import KLIPSettings

    values = {k: v for k, v in defaults.items() if k in SETTING_FLAGS}
    values.update({k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k, None) is not None})
    block = getattr(args, "block_size", None)
    if block is not None:
        values["block_size"] = block[0] if isinstance(block, list) else block  # eval: several, the first leads
    elif "block_size" in defaults:
        values["block_size"] = defaults["block_size"]
    return KLIPSettings(**values)


def check_device(device: str) -> str:
    """``--device``: cpu, or a CUDA device torch can see."""
    import torch

    expect(device == "cpu" or device.startswith("cuda"), "--device", "cpu or cuda[:N]", repr(device))
    if device.startswith("cuda"):
        expect(torch.cuda.is_available(), "--device", "a CUDA device visible to torch",
               f"{device!r} with torch.cuda.is_available() False (use --device cpu)")
    return device


def check_physics(spec: str, image_size: int | None = None) -> None:
    """Parse (and with ``image_size`` build) the operator now, naming ``--physics`` on failure."""
    from klip_med.physics import parse_physics, parse_spec

    try:
        parse_spec(spec) if image_size is None else parse_physics(spec, image_size)
    except KLIPMedError as exc:
        raise KLIPMedError(f"--physics: {exc}") from None


def check_out_folder(out: Path) -> Path:
    """``--out``: a folder, new or existing (not a file)."""
    expect(not out.is_file(), "--out", "a folder (new or existing)", f"a file {str(out)!r}")
    return out


def print_outputs(summary: dict, out: Path) -> None:
    """The files a run wrote, then its one-line result."""
    from klip_med.io.outputs import one_line

    files = summary["outputs"]
    print(f"outputs in {out}/:")
    for key in ("summary", "report", "recon_nifti", "klip_nifti", "klip_z_nifti", "source_dicom", "recon_series",
                "parametric_map", "seg", "secondary_capture"):
        value = files.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            what = "windows" if key == "klip_nifti" else "files"
            more = f" (+{len(value) - 1} {what} in {Path(value[1]).parent}/)" if len(value) > 1 else ""
            value = f"{value[0]}{more}"
        print(f"  {key:<18} {value}")
    if "seg" in files and files["seg"] is None:
        rule = summary.get("threshold", {})
        why = ("no null model applies, so no flag is calibrated (--threshold p95 for an uncalibrated mask)"
               if rule.get("kind") == "none" else f"no block reached the threshold ({rule.get('kind')}:{rule.get('value')})")
        print(f"  seg                (not written: {why})")
    print(one_line(summary))


def add_engine_flags(parser: argparse.ArgumentParser, unit: str) -> argparse._ArgumentGroup:
    """``--engine``, ``--ray-address``, ``--workers``, ``--cpus-per-worker``, ``--gpus-per-worker`` and
    ``--worker-retries`` (:mod:`klip_med.pipeline.engine`); ``unit`` names what one item is."""
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: one worker in this process; ray: Ray actors, each loading the prior once "
                             "(pip install 'klip-med[ray]'; default local)")
    engine.add_argument("--ray-address", help="Ray cluster to join: auto (one started with `ray start --head` "
                                              "on this machine) or ray://HOST:10001 (default: start a local one)")
    engine.add_argument("--workers", type=int, default=1, help="Ray workers (default 1)")
    engine.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="Ray CPUs per worker, also its torch threads (default 1)")
    engine.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="Ray GPUs per worker; 0.5 puts two workers on a GPU (default 0; needs --device cuda)")
    engine.add_argument("--worker-retries", type=int, default=2,
                        help=f"times a {unit} is rerun after its Ray worker died (default 2)")
    return engine


def engine_from_args(args: argparse.Namespace):
    """``(EngineOptions, device)`` from :func:`add_engine_flags`' flags and ``--device``: Ray checked to
    be installed (one error naming the extra), the workers' device checked against their GPUs."""
    from klip_med.pipeline.engine import EngineOptions
    from klip_med.pipeline.optional import require

    engine = EngineOptions(args.engine, args.workers, args.cpus_per_worker, args.gpus_per_worker,
                           args.ray_address, args.worker_retries)
    if engine.engine == "ray":
        require("ray", extra="ray", argument="--engine ray")
        device = args.device  # the workers' device: the driver may have none
        expect(device == "cpu" or device.startswith("cuda"), "--device", "cpu or cuda[:N]", repr(device))
        expect(device == "cpu" or engine.gpus_per_worker > 0, "--gpus-per-worker",
               "> 0 with --device cuda (Ray hides the GPUs from workers that reserve none)", engine.gpus_per_worker)
    else:
        device = check_device(args.device)
    expect(engine.gpus_per_worker == 0 or device != "cpu", "--device", "cuda with --gpus-per-worker > 0", device)
    return engine, device


def add_dicomweb_access_flags(group) -> None:
    """``--auth``, ``--ca-bundle``, ``--timeout``, ``--retries``: how DICOMweb URLs are reached."""
    group.add_argument("--auth", metavar="SPEC",
                       help="credential for DICOMweb URLs, read from where SPEC says, never given here: "
                            "bearer:env:VAR | bearer:file:PATH (a token) | basic:env:VAR | basic:file:PATH "
                            "('user:password'); never printed or written to summary.json")
    group.add_argument("--ca-bundle", metavar="PEM",
                       help="trusted CA certificates for https (default: the system's; TLS is always verified)")
    group.add_argument("--timeout", type=float, default=60.0,
                       help="seconds to wait for a connection and for each answer (default 60)")
    group.add_argument("--retries", type=int, default=3,
                       help="further tries of a request that failed to connect or got 408/429/502/503/504, with "
                            "exponential back-off from 0.5 s (default 3)")


def dicomweb_options(args: argparse.Namespace):
    """``DicomWebOptions`` from :func:`add_dicomweb_access_flags`' flags (the credential is read now)."""
    from klip_med.io.dicomweb import DicomWebOptions, read_credential

    credential = read_credential(args.auth) if args.auth else None
    return DicomWebOptions(credential=credential, ca_bundle=args.ca_bundle, timeout_s=args.timeout,
                           retries=args.retries)
