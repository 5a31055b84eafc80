#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the paths a CPU cannot prove, on a lent GPU machine, in under 10 minutes
# (issue 32 item 7). The test suite never needs it.
#
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.json, or benchmarks/results/
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_check.sh
#
# Checks (benchmarks/gpu_check.py does the work; each has its own time limit here, 540 s in all):
#   fsdp   FSDP2 over NCCL (torchrun, 1 process per GPU, at most 2): peftkit's shard() with the fp32
#          and bf16 policies against one unsharded model; QLoRA with NF4 weights stored in bf16
#   nf4    bitsandbytes NF4 on CUDA: forward and backward against x @ dequant(W).T
#   train  `peftkit train` on CUDA: fp32, bf16 autocast, NF4 base computing in bf16
#   serve  `peftkit serve --device cuda`: a greedy completion against the CPU's
# Without CUDA it says so and exits 2 having run nothing. Exit 0: every check passed; 1: not.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
HELPER=benchmarks/gpu_check.py
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c 'import torch, peftkit' 2>/dev/null; then
    echo "gpu_check: $PYTHON cannot import torch and peftkit; set PYTHON to the project's" \
        "virtual environment's python (PYTHON=.venv/bin/python). Nothing was run." >&2
    exit 2
fi
"$PYTHON" "$HELPER" cuda-present || exit 2

RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
PROCESSES=$(( GPUS >= 2 ? 2 : 1 ))

check() {  # check NAME SECONDS COMMAND...: run it under a limit, record its exit status and time
    local name=$1 limit=$2 start code
    shift 2
    echo "== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout --kill-after 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    code=$?
    echo "$name $code $(( $(date +%s) - start ))" >>"$WORK/status"
    tail -n 5 "$WORK/$name.log"
}

check fsdp 150 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$PROCESSES" \
    "$HELPER" fsdp --json "$WORK/fsdp.json"
check nf4 90 "$PYTHON" "$HELPER" nf4 --json "$WORK/nf4.json"
check train 180 "$PYTHON" "$HELPER" train --json "$WORK/train.json"
check serve 120 "$PYTHON" "$HELPER" serve --json "$WORK/serve.json"

"$PYTHON" "$HELPER" merge --work "$WORK" --output "$RESULTS/gpu_check.json" || exit 1
"$PYTHON" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["passed"] else 1)' \
    "$RESULTS/gpu_check.json"
