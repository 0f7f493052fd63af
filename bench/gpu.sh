#!/usr/bin/env bash
# The GPU bench in one go, on a machine with an NVIDIA GPU (about 10 minutes at most):
#   1. checks the GPU is there (nvidia-smi);
#   2. makes a virtual environment with the project and its gpu extra (onnxruntime-gpu with the
#      CUDA / cuDNN wheels; the CPU onnxruntime is removed, both install the same module);
#      --wheelhouse DIR installs from DIR only, for machines without network;
#   3. runs python -m bench.gpu: the gpu worker's startup check (a small model must run on the CUDA
#      provider), then fp16 / int8 / int4 jobs on the bench models on target gpu and on this CPU,
#      and prints the latency ratios against FP32 on the GPU beside the CPU's.
#
# usage: bench/gpu.sh [--dry-run] [--wheelhouse DIR] [--venv DIR] [-- ARGS for python -m bench.gpu]
#   --dry-run   no GPU, no install: the Python part with the current interpreter ($PYTHON, default
#               python3) on this CPU, every gpu row flagged as not measured on the GPU
# The bench models come from bench/out/models (built by bench.models with torch and scikit-learn
# where missing: carry that folder to a machine that has neither).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
WHEELHOUSE=""
VENV="bench/out/gpu-venv"
LIMIT_SECONDS="${LIMIT_SECONDS:-600}"
ARGS=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --) shift; ARGS+=("$@"); break ;;
        *) echo "bench/gpu.sh: error: unknown argument $1 (see the usage at the top of this file)" >&2; exit 2 ;;
    esac
done

if [[ "$DRY_RUN" == 1 ]]; then
    exec "$PYTHON" -m bench.gpu --dry-run ${ARGS[@]+"${ARGS[@]}"}
fi

started=$(date +%s)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: error: no NVIDIA GPU here (nvidia-smi missing or failing); --dry-run checks the bench on the CPU" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

PIP_SOURCE=()
if [[ -n "$WHEELHOUSE" ]]; then
    PIP_SOURCE=(--no-index --find-links "$WHEELHOUSE")
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    # system site packages: a machine image's torch / CUDA wheels are reused, not downloaded again
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q ${PIP_SOURCE[@]+"${PIP_SOURCE[@]}"} -e '.[gpu]'
# onnxruntime and onnxruntime-gpu install the same 'onnxruntime' module: keep only the gpu build
"$VPY" -m pip uninstall -q -y onnxruntime >/dev/null 2>&1 || true
"$VPY" -m pip install -q ${PIP_SOURCE[@]+"${PIP_SOURCE[@]}"} --force-reinstall --no-deps onnxruntime-gpu
"$VPY" -m pip install -q ${PIP_SOURCE[@]+"${PIP_SOURCE[@]}"} 'onnxruntime-gpu[cuda,cudnn]' \
    || echo "bench/gpu.sh: note: the CUDA / cuDNN wheels did not install; relying on the system's CUDA libraries" >&2
"$VPY" -c 'import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'

left=$(( LIMIT_SECONDS - ($(date +%s) - started) ))
if (( left < 60 )); then
    echo "bench/gpu.sh: error: the install took $(( $(date +%s) - started )) s, no time left to bench" >&2
    exit 1
fi
exec timeout "$left" "$VPY" -m bench.gpu ${ARGS[@]+"${ARGS[@]}"}
