#!/usr/bin/env bash
# Lint and type check (what .ci/run runs before the tests): ruff check, ruff format --check, mypy on tunerd.
# mypy sees the installed layout (tunerd.kernels = kernels/, tunerd.schedules = schedules/, tunerd.db = db/),
# laid out here as symlinks, so it needs no install and no build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT=$PWD
if [ "${1:-}" != "--mypy-only" ]; then  # pre-commit runs ruff through its own hooks
  $PY -m ruff check .
  $PY -m ruff format --check .
fi
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/tunerd"
for f in tunerd/*; do ln -s "$ROOT/$f" "$tree/tunerd/"; done
for d in kernels schedules db; do ln -s "$ROOT/$d" "$tree/tunerd/$d"; done
(cd "$tree" && $PY -m mypy --config-file "$ROOT/pyproject.toml" -p tunerd)
