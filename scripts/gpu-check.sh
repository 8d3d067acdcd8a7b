#!/usr/bin/env bash
# The first GPU run in one prepared command (issue 16): pytest -m gpu, the benchmark on a representative
# subset, timing tables for the strategy replay and a static compare, inside a wall-clock budget, with
# every result written to $OUT as it happens. The orchestration is benchmarks/gpu_check.py.
#
#   bash scripts/gpu-check.sh --fetch-wheels      # HERE, once: the wheels the box lacks, into .whl/ (carry it)
#   bash scripts/gpu-check.sh                     # ON THE GPU BOX: budget 540 s (--budget / GPU_CHECK_BUDGET)
#   bash scripts/gpu-check.sh --dry-run --out D   # CPU: the same path on the interpreter, tiny (CI runs it)
#   bash scripts/gpu-check.sh --collect DIR       # HERE: file a fetched $OUT under benchmarks/results/
#
# Other flags: --phases pytest,bench,blocks,replay,static --test-timeout S --maxfail N --workers N
# --bench-args '...' --blocks-args '...' (python -m benchmarks.gpu_check --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
# What the box lacks and the GPU phases use (device KINDS.md lists what it has: torch, triton, numpy, jinja2,
# pytest, pytest-timeout, pytest-xdist, hypothesis, matplotlib, httpx, typer): the store (test_store's GPU
# fingerprint test, tunerd.tuning) and optuna (the tpe strategy in the replay).
CARRY=(SQLAlchemy alembic Mako optuna colorlog)

fetch_wheels() {
  mkdir -p "$WHEELS"
  local specs=()
  for name in "${CARRY[@]}"; do  # the versions installed here (what the tests ran with), else the newest
    v=$($PY -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    specs+=("$name${v:+==$v}")
  done
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${specs[@]}"
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  local dupes
  dupes=$(ls "$WHEELS"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_' 'a-z-' | sort | uniq -d)
  if [ -n "$dupes" ]; then
    echo "error: two versions of: $dupes (pip install on the box refuses them); remove the older" >&2
    return 1
  fi
}

case "${1:-}" in
  --fetch-wheels) fetch_wheels; exit ;;
  --collect) shift; exec $PY -m benchmarks.gpu_check collect "$@" ;;
  -h|--help) sed -n '2,14p' "$0"; exit ;;
esac
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec $PY -m benchmarks.gpu_check run "$@"
