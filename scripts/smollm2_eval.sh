#!/usr/bin/env bash
# Evaluate the SmolLM2 guide models built by scripts/smollm2_guides.sh on the held-out chat-arith
# problems, through the server, and write the table and plot.
#
#   bash scripts/smollm2_eval.sh [RUN] [RESULTS]    (defaults: runs/smollm2, docs/results/smollm2-chat-arith)
#
# 180 held-out problems x 2 seeded samples at temperature 0.8 / top_p 0.9 (the Q-sharp paper's
# sampling), replies of at most 16 tokens as in training. Strengths are a fixed grid, not tuned.
# --resume: configurations already in RESULTS with the same settings are kept, the rest run.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/smollm2}"
results="${2:-docs/results/smollm2-chat-arith}"

.venv/bin/alignserve eval --model "$run/base" --guide-models "$run/guides/guides.json" \
  --serve-args "--max-model-len 256 --max-num-seqs 128" \
  --prompts "$run/prompts/heldout.jsonl" --verifier arith-first-line --out "$results" \
  --samples 2 --max-tokens 16 --concurrency 48 --seed 0 \
  --qsharp value-r1@2,4,8 value-r2@2,4,8 --cd prefix@4,16 --arm arm@0.5,2 --genarm genarm@0.5,2 \
  --best-of-n arith-first-line value-r2 --n 2,4,8 \
  --blockwise prefix --block-candidates 4 --block-tokens 4 --resume
