#!/usr/bin/env bash
# A reward model on SmolLM2-135M-Instruct chat-arith, written by `alignserve train reward` in HF format and
# used two ways: scored three ways in best-of-8 (embedded, transformers, vLLM's pooling runner by URL:
# bench/results/remote_scorer_smollm2.json), and as the label of a value model's rollouts
# (`train value --reward-model`), evaluated at equal KL beside the verifier-trained value-r1
# (docs/results/smollm2-equal-kl).
#
#   bash scripts/smollm2_reward_labels.sh [RUN]   (default runs/soak-smollm2, which holds base/, train.jsonl,
#                                                  train64.jsonl, heldout.jsonl and guides/ of bench/results/soak)
#
# Reward model: the base's first 4 of 30 layers, top 2 and a scalar head trained by Bradley-Terry on (right,
# wrong) pairs of 720 training prompts x 4 rollouts of at most 16 tokens, labelled by arith-first-line.
# Value model value-rm: value-r1's recipe (64 prompts x 4 rollouts, 4 layers, top 2 trained, 40 steps of 32),
# its rollouts labelled by the reward model's score instead of the verifier: a histogram head (11 atoms over
# the training scores' range). Each step whose output exists is skipped; the eval resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/soak-smollm2}"
bin=.venv/bin/alignserve
engine=(--max-model-len 256 --max-num-seqs 128)

[ -f "$run/rm/classifier/config.json" ] || \
  $bin train reward --base "$run/base" --prompts "$run/train.jsonl" --verifier arith-first-line --out "$run/rm" \
    --samples 4 --max-tokens 16 --temperature 0.8 --top-p 0.9 "${engine[@]}" \
    --layers 4 --trainable-layers 2 --steps 200 --batch-size 64 --seed 0 --classifier-out "$run/rm/classifier"
[ -f "$run/guides-rm/value-rm-r1/guide_card.json" ] || \
  $bin train value --base "$run/base" --prompts "$run/train64.jsonl" --reward-model reward \
    --guide-models "$run/rm/guides.json" --out "$run/guides-rm" --name value-rm \
    --samples 4 --max-tokens 16 --temperature 0.8 --top-p 0.9 "${engine[@]}" \
    --layers 4 --trainable-layers 2 --steps 40 --batch-size 32 --seed 1000003
# value-rm beside the soak guides, in the table the equal-KL evaluation reads.
.venv/bin/python - "$run" <<'PY'
import json, sys
from pathlib import Path
table_file = Path(sys.argv[1]) / "guides" / "guides.json"
table = json.loads(table_file.read_text())
table["value-rm"] = "../guides-rm/value-rm-r1"  # train value names round 1 NAME-r1
table_file.write_text(json.dumps(table, indent=2) + "\n")
PY

.venv/bin/python -m bench.remote_scorer --model "$run/base" --guide-models "$run/rm/guides.json" --embedded reward \
  --classifier "$run/rm/classifier" --prompts "$run/heldout.jsonl" --max-tokens 16 \
  --serve-args "--max-model-len 256 --max-num-seqs 128 --enforce-eager" --requests 12 --work "$run/rm/bench" \
  --out bench/results/remote_scorer_smollm2.json
$bin eval --model "$run/base" --guide-models "$run/guides/guides.json" --serve-args "${engine[*]}" \
  --prompts "$run/heldout.jsonl" --verifier arith-first-line --out docs/results/smollm2-equal-kl --samples 2 \
  --max-tokens 16 --concurrency 24 --seed 0 --qsharp value-r1 value-rm --arm arm --genarm genarm --cd prefix \
  --kl-budgets 0.25,0.5,1,2 --best-of-n arith-first-line --n 1,2,4,8 --resume
