#!/usr/bin/env bash
# The whole pipeline: environment -> data -> tokenizer -> pretraining -> evaluation.
#
#   bash speedrun.sh                 # GPUs present: the GPT-2-grade reference run (8xH100 ~1.7 h)
#                                    # no GPU: the offline CPU preset (bundled sample; 2 cores: ~3 min with
#                                    # native bf16, ~11 min in fp32 on a Zen 3 EPYC, dev/LOG.md)
#   bash speedrun.sh --preset cpu    # force the CPU preset
#   WANDB_RUN=my-run bash speedrun.sh   # log to wandb (WANDB_MODE=offline works without network)
#
# Every stage prints what it does and how long it took; a failing stage stops the script.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=auto
while [ $# -gt 0 ]; do
    case "$1" in
        --preset) PRESET="$2"; shift 2 ;;
        --preset=*) PRESET="${1#*=}"; shift ;;
        *) echo "speedrun.sh: unknown argument $1 (use --preset cpu|gpu)" >&2; exit 2 ;;
    esac
done
NGPU=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU') || echo 0)
if [ "$PRESET" = auto ]; then
    if [ "$NGPU" -gt 0 ]; then PRESET=gpu; else PRESET=cpu; fi
fi
case "$PRESET" in cpu|gpu) ;; *) echo "speedrun.sh: --preset must be cpu or gpu, got $PRESET" >&2; exit 2 ;; esac
if [ "$PRESET" = gpu ] && [ "$NGPU" -eq 0 ]; then
    echo "speedrun.sh: --preset gpu needs NVIDIA GPUs and nvidia-smi found none" >&2; exit 2
fi

export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
threads_per_rank() {  # threads_per_rank RANKS: OpenMP threads for each of RANKS processes on this node
    # Each torchrun rank starts its own pool: $(nproc) threads per rank oversubscribe the cores RANKS-fold
    # (dev/LOG.md, 2 ranks on 2 cores). On a GPU node CPU threads only feed the loader and launch
    # kernels: 1 per rank, as torchrun itself defaults to.
    if [ "$PRESET" = gpu ]; then echo 1; return; fi
    local share=$(( $(nproc) / $1 ))
    echo $(( share > 0 ? share : 1 ))
}
# decided here once; a user's OMP_NUM_THREADS wins. The CPU preset trains in one process.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(threads_per_rank 1)}
# every run gets its own directory (a rerun never meets the last one's checkpoints); WANDB_RUN names it and turns wandb on
RUN_NAME=${WANDB_RUN:-speedrun-$(date +%Y%m%d-%H%M%S)}
WANDB_FLAGS=()
[ -n "${WANDB_RUN:-}" ] && WANDB_FLAGS=(--run "$WANDB_RUN")
START=$SECONDS

stage() {  # stage NAME CMD...: run a stage, time it, stop everything if it fails
    local name=$1; shift
    echo
    echo "=== [$name] $*"
    local t0=$SECONDS
    "$@"
    echo "=== [$name] done in $((SECONDS - t0)) s (total $((SECONDS - START)) s)"
}

if [ "$PRESET" = gpu ]; then
    stage setup source scripts/setup_venv.sh auto
else
    stage setup source scripts/setup_venv.sh cpu
fi

if [ "$PRESET" = gpu ]; then
    # ---- the reference run: d24, ClimbMix, FP8, undertrained at ratio 8 (RECIPE: the record's
    # command shape; ~8-9.5 reaches the CORE bar sooner than the default 12) ----------------------
    DATA_DIR=$NANOCHAT_BASE_DIR/base_data
    RUN_DIR=$NANOCHAT_BASE_DIR/runs/$RUN_NAME
    stage data-tokenizer python -m nanochat.dataset -n 8 --data-dir "$DATA_DIR"
    # ~170 shards cover the run; they download while the tokenizer trains
    python -m nanochat.dataset -n 170 --data-dir "$DATA_DIR" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
    DOWNLOAD_PID=$!
    stage tok-train python -m scripts.tok_train --data-dir "$DATA_DIR" --vocab-size 32768 --max-chars 2000000000
    stage tok-eval python -m scripts.tok_eval --data-dir "$DATA_DIR"
    stage data-wait wait $DOWNLOAD_PID
    stage base-train torchrun --standalone --nproc_per_node="$NGPU" -m scripts.base_train -- \
        --depth 24 --target-param-data-ratio 8 --fp8 --device-batch-size 16 --data-dir "$DATA_DIR" \
        "${WANDB_FLAGS[@]}" --run-dir "$RUN_DIR" --core-metric-every 2000 --save-every 2000
    stage base-eval torchrun --standalone --nproc_per_node="$NGPU" -m scripts.base_eval -- \
        --run-dir "$RUN_DIR" --data-dir "$DATA_DIR" --device-batch-size 16
else
    # ---- the CPU preset: the bundled public-domain sample, a d4 model at T=256, the bundled mini
    # CORE bundle; no network. dev/LOG.md has the measurements behind these numbers. -------------
    DATA_DIR=data/sample
    PRESET_DIR=$NANOCHAT_BASE_DIR/cpu_preset
    RUN_DIR=$PRESET_DIR/runs/$RUN_NAME
    export HF_HUB_OFFLINE=1
    # bf16 where the CPU has it in hardware (2.26x faster than fp32 there), else fp32: emulated bf16
    # runs ~50x slower (dev/LOG.md). A user's NANOCHAT_DTYPE wins.
    BF16_NATIVE=$(python -c 'from nanochat.common import cpu_has_native_bf16; print(int(cpu_has_native_bf16()))')
    if [ "$BF16_NATIVE" = 1 ]; then export NANOCHAT_DTYPE=${NANOCHAT_DTYPE:-bfloat16}; else export NANOCHAT_DTYPE=${NANOCHAT_DTYPE:-float32}; fi
    echo "CPU preset: NANOCHAT_DTYPE=$NANOCHAT_DTYPE (native bf16 on this CPU: $BF16_NATIVE)"
    stage tok-train python -m scripts.tok_train --data-dir "$DATA_DIR" --vocab-size 4096 --output-dir "$PRESET_DIR/tokenizer"
    stage tok-eval python -m scripts.tok_eval --data-dir "$DATA_DIR" --tokenizer-dir "$PRESET_DIR/tokenizer"
    stage base-train python -m scripts.base_train \
        --depth 4 --max-seq-len 256 --device-batch-size 16 --total-batch-size 4096 --num-iterations 300 \
        --eval-every 50 --eval-tokens 65536 --core-metric-every 0 --sample-every 0 \
        --data-dir "$DATA_DIR" --tokenizer-dir "$PRESET_DIR/tokenizer" \
        "${WANDB_FLAGS[@]}" --run-dir "$RUN_DIR" --save-every -1
    stage base-eval python -m scripts.base_eval --run-dir "$RUN_DIR" --data-dir "$DATA_DIR" \
        --tokenizer-dir "$PRESET_DIR/tokenizer" --eval-bundle data/eval_bundle_mini --device-batch-size 16 \
        --bpb-tokens 65536
fi
echo
CSV=$(ls -t "$RUN_DIR"/base_eval_step*.csv | head -1)
awk -F, '$1 == "val_bpb" {v = $2} $1 == "core_metric" {c = $2} END {printf "final: val bpb %.4f | CORE %.4f\n", v, c}' "$CSV"
echo "results: $CSV"
echo "speedrun.sh ($PRESET) finished in $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s"
