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
from tunerd.kernels import conv  # noqa: E402

# Under pytest-xdist the workers share the cores: one worker's torch must not take all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (and TRITON_INTERPRET unset)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny-tensor tests (pytestmark = pytest.mark.usefixtures("one_thread")):
    torch's thread pool only adds contention to the interpreter's single thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    conv.forget_layer_schedules()  # each test starts without the schedules earlier tests' layers ran


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    # Generated sources go to a per-run cache so tests never read a stale user cache.
    os.environ["TUNERD_CACHE_DIR"] = str(tmp_path_factory.mktemp("tunerd_cache"))
