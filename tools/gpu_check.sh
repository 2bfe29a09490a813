#!/usr/bin/env bash
# Run tools/gpu_check.py (the GPU paths recemb has never run, one table at the end) within a
# hard time limit, for the few minutes a device machine is lent. The python tool keeps its own
# budget (--budget, 280 s by default) and always prints its table; `timeout` is the backstop.
#
#   tools/gpu_check.sh                          # CUDA when torch sees a GPU, else CPU
#   tools/gpu_check.sh --device cpu --size tiny # the CPU proof
#   GPU_CHECK_LIMIT=600 PYTHON=python3 tools/gpu_check.sh --budget 580
#
# PYTHON picks the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec timeout --kill-after=5 "${GPU_CHECK_LIMIT:-290}" "$PYTHON" tools/gpu_check.py "$@"
