#!/usr/bin/env bash
# Install tunerd, its test tools and the system services its tests use (PostgreSQL, Chromium).
# torch is pinned first: 2.13.0 is a local CPU build here; an unpinned torch would pull
# gigabytes of CUDA wheels. A GPU box keeps the torch it has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip() { $PY -m pip install -q --disable-pip-version-check "$@"; }

if ! $PY -c "import torch" 2>/dev/null; then
  pip "torch==2.13.0"
fi
pip -e ".[service,test]"
# Real model definitions for the model tests (tests/test_train_models.py). --no-deps: an unpinned
# torchvision would replace the CPU torch; its C ops do not load over it (tests/models_zoo.py declares
# the op schemas torchvision needs at import). huggingface_hub (timm's import) comes with its own deps.
pip --no-deps timm "torchvision==0.28.*"
pip huggingface_hub safetensors pyyaml

# System packages for the fleet (PostgreSQL) and dashboard (headless Chromium) tests.
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "note: ${need[*]} not installed (needs root + apt-get); their tests will skip" >&2
  fi
fi
