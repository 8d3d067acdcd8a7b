#!/usr/bin/env bash
# The test suite (CPU: every kernel runs on Triton's interpreter; GPU tests skip without CUDA).
# Tests run in parallel on every core (pytest-xdist; TUNERD_TEST_WORKERS=0 runs them in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
exec ${PYTHON:-python3} -m pytest -q -p no:cacheprovider --durations=25 \
  -n "${TUNERD_TEST_WORKERS:-auto}" --dist worksteal "$@"
