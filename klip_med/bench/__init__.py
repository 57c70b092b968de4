"""``klip-med bench``: speed and memory of posterior sampling with KLIP, and its comparisons.

One benchmark (:func:`run_bench`) loads a prior (or builds an untrained one at another image
size: timing only), measures the bundled demo slice of its modality B times, and reports:

- our sampler (``fast`` = DDS or ``dps``) with the KLIP accumulator: seconds per slice (median of
  ``repeats``), slices and network evaluations per second, peak GPU / host memory, PSNR of the
  posterior mean against the ground truth;
- the accumulator's overhead: the same runs (same seed, same samples) without it, paired, and the
  accumulator timed on its own; its state in bytes (independent of the number of steps);
- the stored-trajectory reference (all T x S x C x H x W updates kept, scored afterwards): time,
  bytes, and that its maps equal the streaming ones;
- deepinv's DPS on the same prior, steps and samples (through our adapter, and plain);
- with ``dtype=bfloat16``: the KLIP block maps and PSNR against the float32 network;
- a roofline line: achieved network TFLOP/s against the device's measured matrix rate.

:func:`run_suite` runs a list of benchmarks in one process under a time budget (one JSON file
that grows as they finish); :func:`train_throughput` times ``klip-med train``'s step at several
batch sizes and :func:`choose_batch` picks the largest one that still helps.

Times are seconds, memory bytes, PSNR dB on the prior's [-1, 1] range (data range 2).
"""

from klip_med.bench.core import overhead_fraction, run_bench, write_report
from klip_med.bench.settings import COMPARISONS, BenchSettings, parse_compare
from klip_med.bench.suite import SuiteEntry, format_table, run_suite, summary_row
from klip_med.bench.train_rate import choose_batch, train_throughput

__all__ = ["COMPARISONS", "BenchSettings", "SuiteEntry", "choose_batch", "format_table", "overhead_fraction",
           "parse_compare", "run_bench", "run_suite", "summary_row", "train_throughput", "write_report"]
