"""``klip-med bench``: time posterior sampling with KLIP (overhead, memory, deepinv and trajectory comparisons)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from klip_med.cli.common import (
    NORMALIZATIONS,
    RUN_DEFAULTS,
    add_block_size_flag,
    add_sampler_parameter_flags,
    add_windows_flag,
    check_device,
)
from klip_med.errors import expect


def run_command(args: argparse.Namespace) -> int:
    from klip_med.bench import BenchSettings, parse_compare, run_bench, write_report

    if args.json:  # fail before the (long) benchmark, not after it
        target = Path(args.json)
        expect(target.parent.is_dir() and not target.is_dir(), "--json",
               "a file path in an existing folder", repr(args.json))
    settings = BenchSettings(
        prior=args.prior, device=args.device, image_size=args.image_size, samples=args.samples,
        steps=args.steps, sampler=args.sampler, batch=args.batch, repeats=args.repeats, warmup=args.warmup,
        compare_repeats=args.compare_repeats, physics=args.physics, dtype=args.dtype, compile=args.compile,
        compile_mode=args.compile_mode, channels_last=args.channels_last, tf32=args.tf32,
        compare=parse_compare(args.compare), windows=tuple(args.windows or ["full"]), seed=args.seed,
        block_size=args.block_size, deepinv_weight=args.deepinv_weight, normalization=args.normalization,
        **{k: getattr(args, k) for k in ("dps_zeta", "dds_eta", "dds_gamma", "cg_iters") if getattr(args, k) is not None},
    )
    check_device(settings.device)
    report = run_bench(settings)
    report["command"] = "klip-med " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    if args.json:
        write_report(report, args.json)
    _print_summary(report, args.json)
    return 0


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _print_summary(r: dict, path: str | None) -> None:
    print(f"{r['prior']} ({r['weights']}) {r['image_size']}x{r['image_size']}, {r['sampler']}, "
          f"S={r['samples']} N={r['steps']} B={r['batch']} on {r['device']} ({r['device_name']}), {r['dtype']}")
    print(f"  {_fmt(r['seconds_per_slice'])} s/slice, {_fmt(r['slices_per_second'])} slices/s, "
          f"{_fmt(r['nfe_per_second'])} network evaluations/s, PSNR {_fmt(r['psnr_db'], '.2f')} dB")
    print(f"  KLIP overhead {_fmt(100 * r['klip_overhead_fraction'], '.2f')}% (whole runs), "
          f"{_fmt(100 * r['klip_overhead_isolated_fraction'], '.3f')}% (accumulator alone); "
          f"state {r['accumulator_peak_bytes']} bytes")
    if r["trajectory_bytes"] is not None:
        print(f"  stored trajectory: {_fmt(r['trajectory_seconds_per_slice'])} s/slice, {r['trajectory_bytes']} bytes")
    if r["deepinv_seconds_per_slice"] is not None:
        print(f"  deepinv DPS: {_fmt(r['deepinv_seconds_per_slice'])} s/slice (adapter), "
              f"{_fmt(r['deepinv_plain_seconds_per_slice'])} s/slice (plain), "
              f"PSNR {_fmt(r['deepinv_psnr_db'], '.2f')} dB")
    if r["bf16_klip_max_rel_error"] is not None:
        print(f"  bf16 vs float32 KLIP block maps: max rel. error {_fmt(r['bf16_klip_max_rel_error'])}")
    print(f"  peak memory: GPU {r['peak_gpu_bytes']} bytes, host {r['peak_host_bytes']} bytes")
    if path:
        print(f"wrote {path}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``klip-med`` subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="time posterior sampling with KLIP (overhead, memory, deepinv and trajectory comparisons)",
        description=(
            "Reconstruct the bundled demo slice of the prior's modality with our sampler, with and without "
            "the KLIP accumulator (same seed), and report seconds per slice, slices and network evaluations "
            "per second, peak GPU / host memory, the accumulator's overhead and bytes, PSNR, and the "
            "comparisons chosen with --compare: deepinv's DPS on the same prior / steps / samples, and the "
            "reference approach of storing the full (T,S,C,H,W) trajectory. Warm-up runs are excluded; "
            "times are medians of --repeats. An --image-size other than the prior's builds an untrained "
            "network of the same architecture (timing only, no PSNR)."
        ),
        epilog="example: klip-med bench --prior mri-brain-flair-128 --samples 4 --steps 50 --sampler fast "
               "--json bench.json",
    )
    p.add_argument("--prior", default="mri-brain-flair-128", help="shipped prior name or prior folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--image-size", type=int, help="image side in pixels (default: the prior's own)")
    p.add_argument("--samples", type=int, default=4, help="posterior samples S per slice (default 4)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps N (default 50)")
    p.add_argument("--sampler", default="fast", help="fast (DDS, no backprop) or dps (default fast)")
    p.add_argument("--batch", type=int, default=1, help="slices B per sampler call (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs with and without KLIP (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs of min(N, 3) steps (default 1)")
    p.add_argument("--compare-repeats", type=int, default=1,
                   help="timed runs of each comparison and of the float32 reference (default 1)")
    p.add_argument("--physics", help="operator spec (default: the demo's for the prior's modality, "
                                     "mri:accel=4,center=0.08,noise=0.01 or ct-sparse:views=60,noise=0.5)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (autocast of the network only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for the network")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls / convolutions on CUDA")
    p.add_argument("--compare", default="deepinv,trajectory",
                   help="comparisons to run: deepinv, trajectory, both comma-separated, or none (default both)")
    add_windows_flag(p, "KLIP windows the accumulator fills: full | t:A,B | sigma:A,B (default full)")
    add_block_size_flag(p, 8, "block side for the bf16 block-map comparison (default 8)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="transition",
                   help="the accumulator's KL normalisation (default transition)")
    add_sampler_parameter_flags(p, RUN_DEFAULTS)
    p.add_argument("--deepinv-weight", type=float, default=1.0, help="deepinv DPS guidance weight (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the measurement and every run (default 0)")
    p.add_argument("--json", help="write the report to this JSON file (atomically)")
    p.set_defaults(run=run_command)
    return p
