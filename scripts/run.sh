#!/usr/bin/env bash
# The main job: tune the `quick` suite on this machine's device into the default SQLite store,
# list the winners and export them as a bundle. On a machine without CUDA everything runs on
# Triton's interpreter and is labelled so: those timings never answer a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUITE=${SUITE:-quick}
BUDGET=${BUDGET:-6}
BUNDLE=${BUNDLE:-tunerd-$SUITE.bundle}
$PY -m tunerd tune --suite "$SUITE" --budget "$BUDGET"   # the default strategy (tunerd.tuning.DEFAULT_STRATEGY)
COLUMNS=${COLUMNS:-140} $PY -m tunerd show
$PY -m tunerd export --out "$BUNDLE"
