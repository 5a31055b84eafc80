#!/bin/bash
# The Text-to-SQL SFT -> DPO / GRPO chain (#31 item 5), each step under the heavy lock.
set -e
cd /work/exp
P=/work/main/.venv/bin/python
PK=/work/main/.venv/bin/peftkit
L="flock /tmp/peftkit-heavy.lock"
step() { echo "=== $(date -u +%H:%M:%S) $*"; }
if [ ! -f sft/app_eval_sql.json ]; then step sft-eval; $L $PK app-eval sft --app sql --max-new-tokens 96 --skip-base; fi
if [ ! -d sft-merged ]; then step merge; $L $PK merge sft --output sft-merged; fi
if [ ! -f sql-pairs.jsonl ]; then step pairs; $L $P -m peftkit.apps.text_to_sql.pairs sft --output sql-pairs.jsonl --max-questions 400; fi
for seed in 0 1; do
  if [ ! -f dpo-s$seed/summary.json ]; then step dpo $seed; $L $PK train /work/main/recipes/app-sql-smollm2-dpo.yaml --model /work/exp/sft-merged --set task.train_file=/work/exp/sql-pairs.jsonl --set training.seed=$seed --output-dir dpo-s$seed; fi
  if [ ! -f dpo-s$seed/app_eval_sql.json ]; then step dpo-eval $seed; $L $PK app-eval dpo-s$seed --app sql --dataset bank-sql --max-new-tokens 96 --skip-base; fi
  if [ ! -f grpo-s$seed/summary.json ]; then step grpo $seed; $L $PK train /work/main/recipes/app-sql-smollm2-grpo.yaml --model /work/exp/sft-merged --set training.seed=$seed --output-dir grpo-s$seed; fi
  if [ ! -f grpo-s$seed/app_eval_sql.json ]; then step grpo-eval $seed; $L $PK app-eval grpo-s$seed --app sql --max-new-tokens 96 --skip-base; fi
done
step done
