#!/usr/bin/env bash
# One lent-GPU device call for issue 17: measure speed, then continue training both shipped priors.
# How to use it, what comes back and what to do after: docs/gpu-session.md.
#
#   bash examples/gpu_session.sh --prepare   # here, on the CPU: wheels into .whl/, training packs into
#                                            # .gpu-pack/, and the size of what the call carries (<= 64 MiB)
#   bash examples/gpu_session.sh --dry-run   # here, on the CPU: every phase for a few steps
#                                            # (OUT defaults to runs/gpu-session-dry)
#   bash examples/gpu_session.sh             # on the device machine, as the whole command of one `run`
#                                            # call with carry [".whl", ".gpu-pack"] and timeout_s 600
#
# Timeline of the device call (seconds from its start; the whole call ends by KLIP_GS_BUDGET_S = 540):
#     0   install the carried wheels into /tmp/site; nvidia-smi; session.json
#   ~15   speed: one process runs the klip-med bench suite at 128x128, S=4, N=100 (examples/gpu_session.py
#         speed_entries: eager float32 / bf16, our DPS vs deepinv's, slice batches, then the training
#         probe, then torch.compile and CUDA-graph entries while they fit) -> $OUT/bench.json after each
#   165   training: both priors at once, each continuing its shipped EMA weights with bf16 autocast,
#         torch.compile, fused AdamW and the probe's batch; a tar per prior into $OUT every minute
#   520   trainings stop (time limit; killed 20 s later if still running)
#  ~530   plateau verdicts, the $OUT limits check, the speed table and the training summaries printed last
#
# Knobs (environment): OUT; KLIP_GS_BUDGET_S; KLIP_GS_SPEED_S (end of the speed phase; 0 skips the suite
# but keeps the training probe); KLIP_GS_TRAIN_END_S; KLIP_GS_DEVICE; KLIP_GS_BENCH_PRIOR; KLIP_GS_SPEED_ONLY
# (labels); KLIP_GS_PROBE_SIZE (the probe's image side); KLIP_GS_JOBS ("NAME:PACK:INIT[:PRESET] ...", INIT "-"
# = from scratch); KLIP_GS_BATCH; KLIP_GS_STEPS and KLIP_GS_LR_FLOOR (a cool-down); KLIP_GS_WORK;
# KLIP_GS_COMPILE_BACKEND; KLIP_GS_CHECKPOINT_MIN; KLIP_GS_PY.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=device
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --prepare) MODE=prepare ;;
  "") ;;
  *) echo "usage: bash examples/gpu_session.sh [--prepare | --dry-run]" >&2; exit 2 ;;
esac
if [ -n "${KLIP_GS_PY:-}" ]; then PY=$KLIP_GS_PY
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
HELPER="$ROOT/examples/gpu_session.py"

if [ "$MODE" = prepare ]; then
  # the packages the device image lacks (KINDS.md lists what it has), at the versions of this checkout
  WANT=$("$PY" "$HELPER" wheels) || exit 1
  "$PY" "$HELPER" import-check || exit 1
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WANT || exit 1
  "$PY" "$HELPER" pack --data-root "${KLIP_MED_DATA_ROOT:-/work/shared/data}" || exit 1
  "$PY" "$HELPER" travel-size --carry .whl .gpu-pack
  exit $?
fi

if [ "$MODE" = dry ]; then
  OUT=${OUT:-$ROOT/runs/gpu-session-dry}
  DEV=${KLIP_GS_DEVICE:-cpu}; BUDGET=${KLIP_GS_BUDGET_S:-1800}; SPEED_S=${KLIP_GS_SPEED_S:-1200}
  TRAIN_END_S=${KLIP_GS_TRAIN_END_S:-$((BUDGET - 30))}; BACKEND=${KLIP_GS_COMPILE_BACKEND:-eager}
  CKPT_MIN=${KLIP_GS_CHECKPOINT_MIN:-0.002}; DRY=--dry
  WORK=${KLIP_GS_WORK:-${TMPDIR:-/tmp}/klip-gs-dry-work-$$}
else
  OUT=${OUT:?OUT must name the folder that comes back (the device machine sets it)}
  DEV=${KLIP_GS_DEVICE:-cuda}; BUDGET=${KLIP_GS_BUDGET_S:-540}; SPEED_S=${KLIP_GS_SPEED_S:-165}
  TRAIN_END_S=${KLIP_GS_TRAIN_END_S:-520}; BACKEND=${KLIP_GS_COMPILE_BACKEND:-inductor}
  CKPT_MIN=${KLIP_GS_CHECKPOINT_MIN:-1}; DRY=
  WORK=${KLIP_GS_WORK:-/tmp/klip-gs-work}
fi
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd); WORK=$(cd "$WORK" && pwd)
exec > >(tee -a "$OUT/session.log") 2>&1
T0=$(date +%s)
say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
left() { local n=$(( T0 + $1 - $(date +%s) )); echo $(( n > 1 ? n : 1 )); }  # timeout 0 would mean none
say "gpu_session ($MODE) in $ROOT, OUT=$OUT, work=$WORK, device=$DEV, budget ${BUDGET}s"

# --- 0. setup: the carried wheels, the machine
if [ -d .whl ] && ! "$PY" -c "import monai, deepinv, highdicom, nibabel" 2>/dev/null; then
  say "installing $(ls .whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
if [ "$MODE" = device ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || { say "no CUDA: stopping"; exit 1; }
fi
"$PY" "$HELPER" setup --out "$OUT" --device "$DEV" --mode "$MODE" --start "$T0" --budget "$BUDGET" \
  --speed-end "$SPEED_S" --train-end "$TRAIN_END_S" || { say "setup failed"; exit 1; }

# --- 1. speed (the suite stops starting entries at SPEED_S; a hard stop 45 s later)
PROBE=${KLIP_GS_BENCH_PRIOR:-mri-brain-flair-128}
ONLY=()
if [ "$SPEED_S" = 0 ]; then ONLY=(--only none); SPEED_S=60; fi
if [ -n "${KLIP_GS_SPEED_ONLY:-}" ]; then ONLY=(--only $KLIP_GS_SPEED_ONLY); fi
say "phase 1: speed until +${SPEED_S}s"
timeout -k 5 "$(left $((SPEED_S + 45)))" "$PY" "$HELPER" speed --out "$OUT" --device "$DEV" \
  --deadline $((T0 + SPEED_S)) --prior "$PROBE" --probe-prior "$PROBE" --compile-backend "$BACKEND" \
  ${KLIP_GS_PROBE_SIZE:+--probe-size "$KLIP_GS_PROBE_SIZE"} "${ONLY[@]}" $DRY || say "speed phase ended with status $?"

# --- 2. training (both jobs at once; each stops at TRAIN_END_S, killed 20 s later)
JOBS=()
for job in ${KLIP_GS_JOBS:-}; do JOBS+=(--job "$job"); done
BATCH=(); [ -n "${KLIP_GS_BATCH:-}" ] && BATCH=(--batch "$KLIP_GS_BATCH")
[ -n "${KLIP_GS_STEPS:-}" ] && BATCH+=(--steps "$KLIP_GS_STEPS")        # a cool-down session: the schedule's
[ -n "${KLIP_GS_LR_FLOOR:-}" ] && BATCH+=(--lr-floor "$KLIP_GS_LR_FLOOR")  # length and final lr fraction
say "phase 2: training until +${TRAIN_END_S}s"
timeout -k 5 "$(left $((TRAIN_END_S + 40)))" "$PY" "$HELPER" train --out "$OUT" --work "$WORK" --device "$DEV" \
  --deadline $((T0 + TRAIN_END_S)) --compile-backend "$BACKEND" --checkpoint-minutes "$CKPT_MIN" \
  "${JOBS[@]}" "${BATCH[@]}" $DRY || say "training phase ended with status $?"

# --- 3. verdicts, the $OUT check, the tables (printed last: the reply's output tail)
"$PY" "$HELPER" verdict --out "$OUT" --device "$DEV" $DRY || say "verdict phase ended with status $?"
ls -la "$OUT"
say "done in $(( $(date +%s) - T0 )) s"
sleep 1  # let tee finish session.log
