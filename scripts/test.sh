#!/usr/bin/env bash
# The test suite (CPU: every kernel runs on Triton's interpreter; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
exec ${PYTHON:-python3} -m pytest -q -p no:cacheprovider --durations=25 "$@"
