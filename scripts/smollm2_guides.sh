#!/usr/bin/env bash
# Rebuild the SmolLM2-135M-Instruct guide models for the chat-arith task from a seed, with the
# same commands a user runs for their own base model (README: "Bring your own model").
#
#   bash scripts/smollm2_guides.sh [OUT]        (default OUT: runs/smollm2)
#
# Writes OUT/base (the converted model), OUT/prompts/{train,heldout}.jsonl and OUT/guides/
# (rollouts, guide models value-r1, value-r2, value-q, prefix, arm, genarm and guides.json). Each step
# whose output exists is skipped, so an interrupted run continues where it stopped.
# Serve them:  alignserve serve --model OUT/base --guide-models OUT/guides/guides.json
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/smollm2}"
bin=.venv/bin/alignserve

# Sampling as the Q-sharp paper (temperature 0.8, top_p 0.9); 8 samples per prompt in round 1
# and 4 in round 2 (the paper takes 16) and replies of at most 16 tokens keep the whole build
# under an hour on 2 cores.
rollout_flags=(--samples 8 --max-tokens 16 --temperature 0.8 --top-p 0.9 --max-num-seqs 256 --max-model-len 128)
# Guides cut from the base's first 4 of 30 layers (~1/7 of its layer compute), top 2 layers and
# the head trained.
guide_flags=(--layers 4 --trainable-layers 2 --steps 200 --batch-size 64 --seed 0)

[ -f "$out/base/config.json" ] || $bin models smollm2 "$out/base"
[ -f "$out/prompts/train.jsonl" ] || $bin train prompts chat-arith "$out/prompts/train.jsonl" --split train
[ -f "$out/prompts/heldout.jsonl" ] || $bin train prompts chat-arith "$out/prompts/heldout.jsonl" --split heldout

# Q-sharp value model, two rounds: round 2 rolls in with the round-1 guided policy (qsharp, eta 2).
$bin train value --base "$out/base" --prompts "$out/prompts/train.jsonl" --verifier arith-first-line \
  --out "$out/guides" --rounds 2 --rollin-strength 2 --rollin-samples 4 "${rollout_flags[@]}" "${guide_flags[@]}"
# CD-FUDGE prefix scorer, ARM and GenARM on the round-1 (base) rollouts.
for kind in prefix arm genarm; do
  [ -f "$out/guides/$kind/guide_card.json" ] || \
    $bin train "$kind" --base "$out/base" --rollouts "$out/guides/rollouts-r1.jsonl" --out "$out/guides" \
      "${guide_flags[@]}"
done
# A Q-type value model (every next token scored from one forward, a 576 x 49152 head) on the round-1
# rollouts: the other head shape the benchmark suite measures (`alignserve bench`).
[ -f "$out/guides/value-q/guide_card.json" ] || \
  $bin train value --base "$out/base" --rollouts "$out/guides/rollouts-r1.jsonl" --out "$out/guides" \
    --name value-q --scoring q "${guide_flags[@]}"
