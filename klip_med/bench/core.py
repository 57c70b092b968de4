"""``run_bench``: one benchmark, end to end, as a JSON-ready dict (see :mod:`klip_med.bench`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from klip_med.bench.case import BenchCase, build_case, posterior_means, psnr_db
from klip_med.bench.runs import Runner, TrajectoryStore, accumulator_alone, make_windows, relative_difference
from klip_med.bench.settings import BenchSettings
from klip_med.bench.timing import (
    HOST_PEAK_METHOD,
    Clock,
    environment,
    host_peak_bytes,
    load_average,
    matmul_tflops,
    median,
)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """Allow TF32 on CUDA inside the block; the previous flags are restored."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def overhead_fraction(with_klip: list[float], without_klip: list[float]) -> float:
    """Median over repeats of ``(t_with - t_without) / t_without`` (runs paired in order)."""
    return median([(w - wo) / wo for w, wo in zip(with_klip, without_klip, strict=True)])


def network_gflop(prior, device: str) -> float:
    """GFLOP of one network forward on one image (``torch.utils.flop_counter``, matmul/conv only)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, *prior.image_shape), device=device)
    t = torch.full((1,), 500.0, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        prior.eps(x, t)
    return counter.get_total_flops() / 1e9


def _ours(runner: Runner, prior) -> dict[str, Any]:
    """Warm-up, then ``repeats`` pairs of runs with / without the accumulator (order alternating)."""
    s = runner.settings
    started = time.perf_counter()
    for _ in range(s.warmup):
        runner.run(prior, [runner.accumulator(prior)], steps=min(s.steps, 3))
        runner.run(prior, [], steps=min(s.steps, 3))
    runner.clock.sync()
    warmup_seconds = time.perf_counter() - started
    runner.clock.reset_peak()
    host_before = host_peak_bytes()
    with_s, without_s, same = [], [], True
    last = None
    for r in range(s.repeats):
        for klip in ((True, False) if r % 2 == 0 else (False, True)):
            acc = runner.accumulator(prior) if klip else None
            result, seconds = runner.run(prior, [acc] if klip else [])
            if klip:
                with_s.append(seconds)
                last = (result, acc)
            else:
                without_s.append(seconds)
                plain = result
        same = same and torch.equal(last[0].samples, plain.samples)
    result, acc = last
    return {"with_klip_s": with_s, "without_klip_s": without_s, "result": result, "accumulator": acc,
            "warmup_seconds": warmup_seconds,
            "same_samples_with_and_without_klip": bool(same), "peak_gpu_bytes": runner.clock.peak_bytes(),
            "peak_host_bytes": host_peak_bytes(), "host_peak_growth_bytes": host_peak_bytes() - host_before}


def _trajectory(runner: Runner, prior, streaming_maps: torch.Tensor) -> dict[str, Any]:
    """The stored-trajectory reference: sampling with every update kept, then scoring."""
    s, clock = runner.settings, runner.clock
    windows = make_windows(s.windows, prior)
    sample_s, score_s = [], []
    for _ in range(s.compare_repeats):
        store = TrajectoryStore()
        clock.reset_peak()
        _, seconds = runner.run(prior, [store])
        maps, scoring = clock.time(lambda store=store: store.score(windows))
        sample_s.append(seconds)
        score_s.append(scoring)
    total = median([a + b for a, b in zip(sample_s, score_s, strict=True)])
    return {
        "trajectory_bytes": store.bytes,
        "trajectory_bytes_formula": "steps x (B*S) x C x H x W x 4",
        "sampling_seconds": sample_s, "scoring_seconds": score_s,
        "seconds_per_slice": total / s.batch,
        "peak_gpu_bytes": clock.peak_bytes(),
        "max_relative_difference_vs_streaming": relative_difference(maps, streaming_maps),
    }


def _bf16_check(runner: Runner, case: BenchCase, bf16_acc, bf16_means) -> dict[str, Any]:
    """The float32 network on the same seed: KLIP block maps and PSNR, bf16 against float32."""
    from klip_med.score.blocks import pool_blocks

    s = runner.settings
    reference = case.network_view(s, bf16=False)
    for _ in range(s.warmup):
        runner.run(reference, [runner.accumulator(reference)], steps=min(s.steps, 3))
    times = []
    for _ in range(s.compare_repeats):
        acc = runner.accumulator(reference)
        result, seconds = runner.run(reference, [acc])
        times.append(seconds)

    def blocks(accumulator) -> torch.Tensor:
        maps = accumulator.result().pixel_nats  # (windows, B*S, H, W)
        per_slice = maps.reshape(maps.shape[0], s.batch, s.samples, *maps.shape[2:]).mean(dim=2)
        return pool_blocks(per_slice, s.block_size).sums

    b16, f32 = blocks(bf16_acc), blocks(acc)
    nonzero = f32.abs() > 1e-3 * f32.abs().amax()
    out = {
        "float32_seconds_per_slice": median(times) / s.batch,
        "klip_block_max_rel_error": relative_difference(b16, f32),
        "klip_block_max_elementwise_rel_error": float(((b16 - f32).abs() / f32.abs())[nonzero].max()),
        "definition": "block sums of the sample-mean KLIP map, block side --block-size; max_rel_error = "
                      "max |bf16 - f32| / max |f32|; elementwise over blocks above 0.1% of the max",
    }
    if case.trained:
        means = posterior_means(result.samples, s, reference.image_shape)
        out["psnr_db_float32"] = psnr_db(means, case.truth)
        out["psnr_db_bf16"] = psnr_db(bf16_means, case.truth)
    return out


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run one benchmark; returns the JSON-ready report (see :mod:`klip_med.bench`)."""
    from klip_med.physics import baseline_reconstruction

    clock = Clock(torch.device(settings.device))
    env = environment(clock.device)
    with _tf32(settings.tf32 and clock.cuda):
        case = build_case(settings)
        prior = case.network_view(settings)
        runner = Runner(case, settings, clock)
        ours = _ours(runner, prior)
        result, acc = ours["result"], ours["accumulator"]
        seconds = median(ours["with_klip_s"])
        means = posterior_means(result.samples, settings, prior.image_shape)
        alone = accumulator_alone(runner, prior, settings.steps)
        report = {
            **{k: env[k] for k in ("device", "device_name", "torch_version", "threads", "load_average")},
            "prior": case.prior.config.name, "weights": "trained" if case.trained else "random-init",
            "image_size": int(prior.image_shape[-1]), "samples": settings.samples, "steps": settings.steps,
            "sampler": settings.sampler, "batch": settings.batch, "dtype": settings.dtype,
            "compile": settings.compiled, "channels_last": settings.channels_last, "tf32": settings.tf32,
            "compile_backend": settings.compile_backend if settings.compile else None,
            "warmup_seconds": ours["warmup_seconds"],
            "physics": case.physics_spec, "repeats": settings.repeats, "warmup": settings.warmup,
            "seconds_per_slice": seconds / settings.batch,
            "slices_per_second": settings.batch / seconds,
            "nfe_per_second": result.nfe * runner.rows / seconds,
            "nfe_per_sample": result.nfe,
            "peak_gpu_bytes": ours["peak_gpu_bytes"],
            "peak_host_bytes": ours["peak_host_bytes"],
            "peak_host_method": HOST_PEAK_METHOD,
            "host_peak_growth_bytes": ours["host_peak_growth_bytes"],
            "klip_overhead_fraction": overhead_fraction(ours["with_klip_s"], ours["without_klip_s"]),
            "klip_overhead_isolated_fraction": alone["accumulator_seconds_per_step"] * settings.steps
            / median(ours["without_klip_s"]),
            "accumulator_peak_bytes": acc.state_bytes,
            "accumulator_seconds_per_step": alone["accumulator_seconds_per_step"],
            "same_samples_with_and_without_klip": ours["same_samples_with_and_without_klip"],
            "psnr_db": psnr_db(means, case.truth) if case.trained else None,
            "psnr_db_baseline": (psnr_db(baseline_reconstruction(case.physics, case.y).reshape(case.truth.shape),
                                         case.truth) if case.trained else None),
            "timings": {"with_klip_s": ours["with_klip_s"], "without_klip_s": ours["without_klip_s"]},
            "case": {"source": case.source, "slices": "the same slice B times, independent noise draws"},
            "windows": list(settings.windows),
        }
        if "trajectory" in settings.compare:
            traj = _trajectory(runner, prior, acc.result().pixel_nats)
            report.update(trajectory_seconds_per_slice=traj["seconds_per_slice"],
                          trajectory_bytes=traj["trajectory_bytes"], trajectory=traj)
        if "deepinv" in settings.compare:
            from klip_med.bench.compare_deepinv import run_deepinv

            dinv = run_deepinv(runner, prior)
            report.update(deepinv_seconds_per_slice=dinv["adapter"]["seconds_per_slice"],
                          deepinv_plain_seconds_per_slice=dinv["plain"]["seconds_per_slice"],
                          deepinv_psnr_db=dinv["adapter"]["psnr_db"], deepinv=dinv)
        if settings.dtype == "bfloat16" and settings.check_bf16:
            bf16 = _bf16_check(runner, case, acc, means)
            report.update(bf16_klip_max_rel_error=bf16["klip_block_max_rel_error"], bf16=bf16)
        gflop = network_gflop(case.prior, settings.device)
        passes = 3.0 if settings.sampler == "dps" else 1.0  # a backward costs about two forwards
        achieved = gflop * passes * result.nfe * runner.rows / seconds / 1e3
        rates = matmul_tflops(clock.device, clock)
        ceiling = rates["device_matmul_tflops"] if settings.dtype == "bfloat16" or not clock.cuda else \
            rates["device_matmul_tflops_float32"]
        report["roofline"] = {
            "network_gflop_per_image_forward": gflop,
            "achieved_network_tflops": achieved,
            "fraction_of_matmul_rate": achieved / ceiling,
            "note": "forward FLOPs (conv + matmul) x evaluations / time; DPS counts backward as 2 forwards; "
                    "fraction_of_matmul_rate: against the measured dense matmul rate of the run's dtype",
            **rates,
        }
    for key in ("trajectory_seconds_per_slice", "trajectory_bytes", "deepinv_seconds_per_slice",
                "deepinv_plain_seconds_per_slice", "deepinv_psnr_db", "bf16_klip_max_rel_error"):
        report.setdefault(key, None)
    report["environment"] = {**env, "load_average_end": load_average()}
    report["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()}
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as JSON, atomically (temp file + rename)."""
    from klip_med.io.json_files import write_json

    return write_json(Path(path), report)
