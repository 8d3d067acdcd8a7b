#!/usr/bin/env bash
# Install tunerd and its test tools. torch is pinned first: 2.13.0 is a local CPU build here;
# an unpinned torch would pull gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
  || $PY -c "import torch" # a GPU box keeps its own torch
$PY -m pip install -q --disable-pip-version-check -e ".[service,test]"
