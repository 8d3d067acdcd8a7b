"""The installed distribution adds only the name `tunerd` to site-packages, so it installs beside
anything: here beside Hugging Face's `kernels` distribution, whose top-level name our repository's
`kernels/` folder shares."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pip(python: str | Path, *args: str, cwd: Path) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd, check=True, timeout=600
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _pip(sys.executable, "wheel", "--no-deps", "-w", str(out), str(ROOT), cwd=out)
    (whl,) = out.glob("tunerd-*.whl")
    return whl


def test_wheel_holds_only_tunerd(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"tunerd", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    for needed in (
        "tunerd/kernels/templates/conv_fwd.py.j2",
        "tunerd/db/alembic.ini",
        "tunerd/db/migrations/script.py.mako",
        "tunerd/db/migrations/versions/0001_initial_schema.py",
        "tunerd/schedules/harness.py",
        "tunerd/templates/dashboard.html",
    ):
        assert needed in names, needed
    assert not any(n.startswith(("tunerd/benchmarks", "tunerd/tests", "tunerd/scripts")) for n in names)


@pytest.mark.slow
def test_installs_beside_huggingface_kernels(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)  # torch, triton, numpy from this interpreter
    py = env_dir / "bin" / "python"
    _pip(py, "install", "--no-deps", str(wheel), cwd=tmp_path)
    _pip(py, "install", "kernels", cwd=tmp_path)  # Hugging Face's kernel hub, with its dependencies
    code = (
        "import kernels, tunerd.kernels, tunerd.schedules.space, tunerd.db.fingerprint, tunerd\n"
        "from importlib.metadata import distribution\n"
        "assert distribution('kernels').metadata['Name'] == 'kernels'\n"
        "assert hasattr(kernels, 'get_kernel'), kernels.__file__\n"
        "assert hasattr(tunerd.kernels, 'render'), tunerd.kernels.__file__\n"
        "site = tunerd.__file__.rsplit('/tunerd/', 1)[0]\n"
        "assert tunerd.kernels.__file__.startswith(site + '/tunerd/kernels/'), tunerd.kernels.__file__\n"
        "assert kernels.__file__.startswith(site + '/kernels/'), kernels.__file__\n"
        "print(tunerd.kernels.render.__module__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "tunerd.kernels.generator"
