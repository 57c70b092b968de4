#!/usr/bin/env bash
# The klip-med bench runs for a lent CUDA GPU (H100 / H200), for issue 7 and BENCHMARKS.md.
#
#   bash examples/bench_gpu.sh [OUT]          # OUT defaults to bench-gpu/; one JSON per run
#
# Phases in order of importance (a GPU session may end early; each phase stands on its own):
#   0  the GPU-only tests (CUDA timing, bf16 + torch.compile, no host sync inside the sampler loop)
#   1  the headline: 128x128, S=4, N=100, fast and dps, float32 vs bf16 vs bf16+compile,
#      with deepinv's DPS and the stored-trajectory reference (median of 5, comparisons median of 3)
#   2  the sweep: image 128/256, S 1/4/8, N 50/100/250/1000, fast/dps (bf16 + channels-last + TF32)
#   3  slice batching: B 1/4/16 at 128, S=4, N=100
#   4  torch.compile with CUDA graphs (mode reduce-overhead) on the headline settings
# Expected cost on an H100: phase 1 a few minutes, phase 2 ~15 min (N=1000 at 256 dominates).
set -euo pipefail
OUT=${1:-bench-gpu}
mkdir -p "$OUT"
PRIOR=mri-brain-flair-128
B="klip-med bench --prior $PRIOR --device cuda --batch 1"
FAST_NET="--dtype bfloat16 --channels-last --tf32"

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"

# --- 0. GPU tests
pytest -q -m gpu tests/test_bench.py

# --- 1. headline (issue 7: "128x128, 4 samples, 100 steps on the H100: aim under 1 s";
#        "KLIP costs at most 2%"; "our DPS at least 2x faster than deepinv's DPS, PSNR within 0.2 dB")
for sampler in fast dps; do
  common="--image-size 128 --samples 4 --steps 100 --sampler $sampler --repeats 5 --warmup 2 --compare-repeats 3"
  $B $common --json "$OUT/headline_${sampler}_f32.json"
  $B $common --dtype bfloat16 --json "$OUT/headline_${sampler}_bf16.json"
  $B $common $FAST_NET --compile --compare trajectory --json "$OUT/headline_${sampler}_bf16_compiled.json"
done

# --- 2. sweep (timing; 256 is an untrained network of the same architecture: timing only)
for sampler in fast dps; do
  for size in 128 256; do
    for S in 1 4 8; do
      for N in 50 100 250 1000; do
        $B --image-size "$size" --samples "$S" --steps "$N" --sampler "$sampler" $FAST_NET \
           --repeats 3 --warmup 1 --compare none --json "$OUT/sweep_${sampler}_${size}_S${S}_N${N}.json"
      done
    done
  done
done
# stored-trajectory memory at the largest setting (T x S x C x H x W floats: 1000 x 8 x 256^2 x 4 B = 2.1 GB)
$B --image-size 256 --samples 8 --steps 1000 --sampler fast $FAST_NET --repeats 1 --compare trajectory \
   --json "$OUT/trajectory_fast_256_S8_N1000.json"

# --- 3. slice batching: B slices x S samples in one network call
for batch in 4 16; do
  klip-med bench --prior $PRIOR --device cuda --batch "$batch" --image-size 128 --samples 4 --steps 100 \
     --sampler fast $FAST_NET --repeats 3 --compare none --json "$OUT/batch_fast_B${batch}.json"
done

# --- 4. CUDA graphs through torch.compile (mode reduce-overhead)
for sampler in fast dps; do
  $B --image-size 128 --samples 4 --steps 100 --sampler "$sampler" $FAST_NET --compile \
     --compile-mode reduce-overhead --repeats 5 --warmup 2 --compare none \
     --json "$OUT/headline_${sampler}_bf16_cudagraphs.json"
done

echo "wrote $OUT/*.json"
