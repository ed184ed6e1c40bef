#!/usr/bin/env bash
# Step-level search on SmolLM2-135M-Instruct: the chat-arith-steps task (two-number sums worked step by
# step; the base writes its steps separated by blank lines), a value model trained on its rollouts as the
# process reward model, the same model exported as a Qwen2.5-Math-PRM checkpoint, and the evaluation of
# best-of-N, weighted best-of-N, pruned best-of-N, beam search, DVTS and particle filtering at budgets
# 4, 8 and 16 (and the exported PRM in best-of-8 and beam-8).
#
#   bash scripts/smollm2_step_search.sh [RUN] [RESULTS]   (defaults: runs/steps, docs/results/smollm2-step-search)
#
# Rollouts: 160 training prompts x 6 samples of at most 96 tokens (temperature 0.8, top_p 0.9). The value
# model: the base's first 4 of 30 layers, top 2 and a Bernoulli head trained (V-type: it scores a prefix
# at its last token). Evaluation: 32 held-out prompts x 2 samples of at most 96 tokens (the rollouts ran at
# about 130 generated tokens per second on 2 cores: a larger evaluation did not fit one session). Each step whose
# output exists is skipped; --resume keeps finished configurations.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/steps}"
results="${2:-docs/results/smollm2-step-search}"
bin=.venv/bin/alignserve

[ -f "$run/base/config.json" ] || $bin models smollm2 "$run/base"
[ -f "$run/train.jsonl" ] || $bin train prompts chat-arith-steps "$run/train.jsonl" --split train --count 160 --seed 0
[ -f "$run/heldout.jsonl" ] || $bin train prompts chat-arith-steps "$run/heldout.jsonl" --split heldout --count 32 --seed 1
[ -f "$run/guides/prm-r1/guide_card.json" ] || \
  $bin train value --base "$run/base" --prompts "$run/train.jsonl" --verifier math --out "$run/guides" --name prm \
    --samples 6 --max-tokens 96 --temperature 0.8 --top-p 0.9 --max-num-seqs 256 --max-model-len 320 \
    --layers 4 --trainable-layers 2 --steps 200 --batch-size 64 --seed 0
[ -f "$run/prm-qwen/config.json" ] || $bin models export-prm "$run/guides/prm-r1" "$run/prm-qwen"
# The guide table: the value model, and its export loaded as a public-format PRM.
.venv/bin/python - "$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
table = json.loads((run / "guides" / "guides.json").read_text())
table["prm-qwen"] = {"path": "../prm-qwen", "kind": "prm"}
(run / "guides" / "search.json").write_text(json.dumps(table, indent=2))
# The exported PRM in best-of-8 and beam-8, beside the value model's own rows.
configs = [{"name": f"{kind}-8(prm-qwen)", "method": f"{kind}(prm-qwen)", "strength": 8, "search": search}
           for kind, search in (("best-of", {"type": "best_of_n", "n": 8, "scorer": "prm-qwen"}),
                                ("beam", {"type": "beam", "beam_width": 2, "expansions": 4, "scorer": "prm-qwen"}))]
(run / "prm-qwen-configs.json").write_text(json.dumps(configs, indent=2))
PY

$bin eval --model "$run/base" --guide-models "$run/guides/search.json" \
  --serve-args "--max-model-len 320 --max-num-seqs 256" \
  --prompts "$run/heldout.jsonl" --verifier math --out "$results" \
  --samples 2 --max-tokens 96 --concurrency 32 --seed 0 \
  --best-of-n prm-r1 --n 4,8,16 --prune prm-r1 --answers math --step-search prm-r1 --expansions 4 \
  --configs "$run/prm-qwen-configs.json" --resume
