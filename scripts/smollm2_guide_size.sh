#!/usr/bin/env bash
# Guide size and data as measured choices (issue 22 item 3), and guidance from a model pair (`contrast`), on
# SmolLM2-135M-Instruct chat-arith:
#   - Q-sharp value models of the base's first 4, 8, 15 and 30 layers (30: a full copy), top 2 layers and the
#     head trained, on 8 rollouts per training prompt; the 4-layer one also on 16;
#   - an expert by rejection-sampling fine-tuning (`train expert`, 4 layers, top 2 trained) and its reference;
#   - each evaluated at KL budgets of 0.5 and 1 nat on the 180 held-out problems x 2 seeded samples.
#
#   bash scripts/smollm2_guide_size.sh [RUN]   (default runs/soak-smollm2: base/, train.jsonl, heldout.jsonl and
#                                               rm/rollouts-r1.jsonl, 720 prompts x 4, of scripts/smollm2_reward_labels.sh)
#
# Rollouts: 4 more samples per prompt (seeds 2880..5759) make 8, 8 more (5760..11519) make 16; sample j of
# prompt i has seed SEED + i * samples + j, so the three files never share a seed. Every trainer holds out 10% of
# the prompts, evaluates every 20 steps and keeps its best validation loss, stopping after 3 evaluations without
# a better one (the curves are in each card and training_curves.png). Each step whose output exists is skipped; the
# evaluation resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/soak-smollm2}"
out="$run/size"
bin=.venv/bin/alignserve
engine=(--max-model-len 256 --max-num-seqs 128)
sampling=(--prompts "$run/train.jsonl" --verifier arith-first-line --max-tokens 16 --temperature 0.8 --top-p 0.9)
fit=(--trainable-layers 2 --steps 200 --batch-size 64 --eval-every 20 --patience 3 --seed 0)
mkdir -p "$out"

timed() {  # timed LOG CMD...: run CMD, appending its wall seconds to $out/build_seconds.tsv
  local label=$1 began
  shift
  began=$(date +%s)
  "$@"
  printf '%s\t%s\n' "$label" "$(( $(date +%s) - began ))" >> "$out/build_seconds.tsv"
}

r4="$run/rm/rollouts-r1.jsonl"
[ -f "$out/rollouts-s4b.jsonl" ] || \
  timed rollouts-4b $bin train rollouts --base "$run/base" --out "$out/rollouts-s4b.jsonl" --seed 2880 --samples 4 \
    "${sampling[@]}" "${engine[@]}"
for layers in 4 8 15 30; do
  [ -f "$out/value-l$layers-s8/guide_card.json" ] || \
    timed "value-l$layers-s8" $bin train value --base "$run/base" --rollouts "$r4" "$out/rollouts-s4b.jsonl" \
      --out "$out" --name "value-l$layers-s8" --layers "$layers" "${fit[@]}"
done
[ -f "$out/rollouts-s8c.jsonl" ] || \
  timed rollouts-8c $bin train rollouts --base "$run/base" --out "$out/rollouts-s8c.jsonl" --seed 5760 --samples 8 \
    "${sampling[@]}" "${engine[@]}"
s16=("$r4" "$out/rollouts-s4b.jsonl" "$out/rollouts-s8c.jsonl")
[ -f "$out/value-l4-s16/guide_card.json" ] || \
  timed value-l4-s16 $bin train value --base "$run/base" --rollouts "${s16[@]}" --out "$out" --name value-l4-s16 \
    --layers 4 "${fit[@]}"
[ -f "$out/expert/guide_card.json" ] || \
  timed expert-l4-s16 $bin train expert --base "$run/base" --rollouts "${s16[@]}" --out "$out" --name expert \
    --layers 4 "${fit[@]}"

$bin eval --model "$run/base" --guide-models "$out/guides.json" --serve-args "${engine[*]}" \
  --prompts "$run/heldout.jsonl" --verifier arith-first-line --out docs/results/smollm2-guide-size --samples 2 \
  --max-tokens 16 --concurrency 24 --seed 0 \
  --qsharp value-l4-s8 value-l8-s8 value-l15-s8 value-l30-s8 value-l4-s16 --contrast expert \
  --kl-budgets 0.5,1 --resume
cp "$out/build_seconds.tsv" docs/results/smollm2-guide-size/build_seconds.tsv
