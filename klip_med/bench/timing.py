"""Clocks, memory high-water marks and the machine description of a benchmark.

Times are seconds. On CUDA a run is bracketed by CUDA events after a ``synchronize`` (the GPU's
own clock; queued work is included); on CPU by ``time.perf_counter``. Memory is bytes.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class Clock:
    """Wall time of a callable on one device (CUDA events on CUDA, ``perf_counter`` on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        """Wait for the device's queued work (no-op on CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], T]) -> tuple[T, float]:
        """``(fn(), seconds)``; the device is idle before the start and after the end."""
        self.sync()
        if not self.cuda:
            start = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, begin.elapsed_time(end) / 1000.0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        """Peak bytes allocated by torch on the GPU since :meth:`reset_peak`; ``None`` on CPU."""
        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None


HOST_PEAK_METHOD = (
    "resource.getrusage(RUSAGE_SELF).ru_maxrss: the process's high-water resident set (Python, torch, "
    "the model and the run), read after our timed runs and before the comparisons"
)


def host_peak_bytes() -> int:
    """The process's peak resident set size so far (``ru_maxrss``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and software a result belongs to."""
    import deepinv
    import monai

    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch_version": torch.__version__,
        "deepinv_version": deepinv.__version__,
        "monai_version": monai.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda_version=torch.version.cuda, gpu_memory_bytes=int(props.total_memory),
                    gpu_capability=f"{props.major}.{props.minor}")
    return info


def _matmul_rate(device: torch.device, clock: Clock, dtype: torch.dtype, n: int, repeats: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)  # random data: zeros run faster
    b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    a @ b  # warm-up

    def work() -> None:
        for _ in range(repeats):
            a @ b

    _, seconds = clock.time(work)
    return round(2 * n**3 * repeats / seconds / 1e12, 4)


def matmul_tflops(device: torch.device, clock: Clock) -> dict[str, Any]:
    """The device's measured dense matrix rate (TFLOP/s): bf16 on CUDA, float32 on CPU; on CUDA
    also float32 (TF32 as the caller has set it)."""
    cuda = clock.cuda
    n, repeats = (8192, 20) if cuda else (1024, 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    out = {"matmul_dtype": str(dtype).removeprefix("torch."), "matmul_size": n,
           "device_matmul_tflops": _matmul_rate(device, clock, dtype, n, repeats)}
    out["device_matmul_tflops_float32"] = (_matmul_rate(device, clock, torch.float32, n, 5) if cuda
                                           else out["device_matmul_tflops"])
    if cuda:
        out["matmul_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out
