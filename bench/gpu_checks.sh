#!/usr/bin/env bash
# Every GPU measurement docs/performance.md and the accelerate configs list as unmeasured, in one run,
# on a machine with one CUDA GPU and vlkit installed (`make install`, or its packages on PYTHONPATH).
#
#   bash bench/gpu_checks.sh [OUT]          # OUT (default runs/gpu-checks): the logs and performance.md
#   CHECKS="gpu recipes" bash bench/gpu_checks.sh      # a subset, in this order
#   LIMIT_gpu=500 GPU_ARGS="--rounds 3" RUNS=/tmp/runs bash bench/gpu_checks.sh OUT
#       LIMIT_<check>: that check's time limit in seconds; GPU_ARGS / RECIPES_ARGS: more arguments for
#       bench/gpu.py / bench/recipes.py; RUNS: where the run folders go (default OUT/runs)
#   BUDGET=540 CHECKS="recipes compile gpu" bash bench/gpu_checks.sh OUT
#       BUDGET: seconds for all the checks together (a GPU rented by the minute): each check's limit is cut
#       to what is left, and a check with less than a minute left is skipped and reported as such
#
# Checks (each bounded by `timeout`, each logged to OUT/<check>.log; a failing check does not stop the rest):
#   recipes   python bench/recipes.py: the tiny recipes (CLIP, align, LoRA instruct) at GPU size, samples/s
#             and one step's profile, the instruct batch fitted to the GPU (at most 1024); the run folders
#             stay in OUT/runs for the checks below
#   compile   the same instruct stage with train.compile
#   flat      the same instruct stage with data.packing: flat and flex attention (padding-free)
#   ddp       recipes/accelerate/ddp.yaml with one process: the tiny instruct recipe through
#             `accelerate launch`, then `vlkit chat` on the result answers one question about an image
#   gpu       python bench/gpu.py --qlora: the LLaVA-1.5-7B-shaped LoRA instruct step, every variant,
#             then the QLoRA step's peak GPU memory
# The benchmarks' tables go to OUT/performance.md (copy the sections into docs/performance.md).
# Seen on one H200 (2026-12-04), start-up included: bench/recipes.py's align stage 45-60 s and instruct stage
# (30 steps) 35-55 s, the ddp check 60 s, bench/gpu.py's seven eager variants 73 s; the instruct stage with
# --compile or --flat had not finished its first step after 120 s / 80 s (before the compile after the probes).
set -uo pipefail
OUT=${1:-$(dirname "$0")/../runs/gpu-checks}  # a relative OUT is taken from where the script is run
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
CHECKS=${CHECKS:-recipes compile flat ddp gpu}
PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-$OUT/runs}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

run_check() {  # name, default seconds (LIMIT_<name> overrides, BUDGET caps), command...
    local name=$1 limit_variable=LIMIT_$1
    local seconds=${!limit_variable:-$2}
    shift 2
    if [ -n "${BUDGET:-}" ]; then
        local left=$((BUDGET - SECONDS))
        if [ "$left" -lt 60 ]; then
            echo "== $name: skipped, ${left}s of BUDGET=${BUDGET}s left"
            return 1
        fi
        [ "$seconds" -gt "$left" ] && seconds=$left
    fi
    local started=$SECONDS
    echo "== $name (at most ${seconds}s): $*"
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "== $name: exit $status after $((SECONDS - started))s (log: $OUT/$name.log)"
    tail -n 25 "$OUT/$name.log"
    return $status
}

ddp_and_chat() {
    "$PYTHON" -m accelerate.commands.launch --config_file recipes/accelerate/ddp.yaml --num_processes 1 -m vlkit train \
        recipes/tiny/instruct.yaml "output_dir=$RUNS/instruct-ddp" "init_from=$RUNS/align" \
        "data.dir=$RUNS/shapes" train.max_steps=20 train.report_to=[] overwrite=true || return
    local image
    image=$(ls "$RUNS"/shapes/images/*.png | head -n 1)
    "$PYTHON" -m vlkit chat "$RUNS/instruct-ddp" --image "$image" --prompt "What shapes do you see?" \
        --max-new-tokens 40
}

for check in $CHECKS; do  # every name checked before any check runs
    case $check in
        recipes | compile | flat | ddp | gpu) ;;
        *) echo "unknown check '$check' (recipes, compile, flat, ddp, gpu)"; exit 2 ;;
    esac
done
case ${BUDGET:-0} in
    '' | *[!0-9]*) echo "BUDGET must be whole seconds, not '$BUDGET'"; exit 2 ;;
esac
export -f ddp_and_chat
export RUNS PYTHON
"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
failed=""
for check in $CHECKS; do
    case $check in
        recipes) run_check recipes 900 "$PYTHON" bench/recipes.py --keep "$RUNS" --out "$OUT/performance.md" \
                     ${RECIPES_ARGS:-} ;;
        compile) run_check compile 600 "$PYTHON" bench/recipes.py --keep "$RUNS" --stages instruct --compile \
                     --out "$OUT/performance.md" ${RECIPES_ARGS:-} ;;
        flat) run_check flat 600 "$PYTHON" bench/recipes.py --keep "$RUNS" --stages instruct --flat \
                  --out "$OUT/performance.md" ${RECIPES_ARGS:-} ;;
        ddp) run_check ddp 600 bash -c ddp_and_chat ;;
        gpu) run_check gpu 1200 "$PYTHON" bench/gpu.py --qlora --out "$OUT/performance.md" ${GPU_ARGS:-} ;;
    esac || failed="$failed $check"
done
if [ -n "$failed" ]; then
    echo "== failed:$failed"
    exit 1
fi
echo "== every check passed"
