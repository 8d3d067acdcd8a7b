import os
import sys
from pathlib import Path

import pytest

# One throwaway PostgreSQL server per session for every test that asks for pg_server / pg_url.
pytest_plugins = ["pg"]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

import tunerd  # noqa: E402,F401  (first: tunerd selects Triton's interpreter on CPU-only machines before triton loads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (and TRITON_INTERPRET unset)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    # Generated sources go to a per-run cache so tests never read a stale user cache.
    os.environ["TUNERD_CACHE_DIR"] = str(tmp_path_factory.mktemp("tunerd_cache"))
