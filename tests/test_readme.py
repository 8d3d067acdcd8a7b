"""The README runs as written on a CPU box: every ```python block executes; every ```bash command exists
(project scripts and modules, `tunerd` subcommands with the options used, system tools on PATH), and the cheap
bash block (inspecting a variant) runs."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.M | re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [code for lang, code in BLOCKS if lang == "bash"]
SEPARATORS = {"&&", "||", "|", ";", "&"}
BUILTINS = {"export", "cd", "echo", "set", "source"}


def test_the_readme_has_blocks():
    assert len(PYTHON) >= 2 and len(BASH) >= 4


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(PYTHON[index], f"README.md python block {index}", "exec"), namespace)
    if "report" in namespace:  # the patch examples print what they did
        assert "swapped" in capsys.readouterr().out.lower() or namespace["report"] is not None


def _commands(block: str) -> list[list[str]]:
    """Each simple command of a bash block as its words (assignments and redirections dropped)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True, posix=True)
        out += [["$()", m] for m in re.findall(r"\$\((\w[\w.-]*)", line)]  # command substitutions
        cmd: list[str] = []
        for w in words + [";"]:
            if w in SEPARATORS:
                if cmd:
                    out.append(cmd)
                cmd = []
            elif not cmd and re.match(r"^[A-Z_][A-Z0-9_]*=", w):
                continue  # VAR=value before a command
            elif w.startswith((">", "<")) and not w.startswith("<files"):
                continue
            else:
                cmd.append(w)
    return [c for c in out if c and c[0] not in BUILTINS]


def _check_tunerd(words: list[str]) -> None:
    from typer.main import get_command

    from tunerd.cli import app

    group = get_command(app)
    assert len(words) > 1 and words[1] in group.commands, f"no `tunerd {words[1:2]}` command: {words}"
    cmd = group.commands[words[1]]
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    for w in words[2:]:
        if w.startswith("--"):
            assert w.split("=")[0] in known, f"`tunerd {words[1]}` has no option {w} (README: {' '.join(words)})"


@pytest.mark.parametrize("index", range(len(BASH)))
def test_bash_commands_exist(index):
    for words in _commands(BASH[index]):
        if words[0] == "$()":
            assert shutil.which(words[1]), f"`{words[1]}` is not installed"
        elif words[0] == "tunerd":
            _check_tunerd(words)
        elif words[0] == "bash":
            assert (ROOT / words[1]).is_file(), f"no script {words[1]}"
        elif words[0] in ("python", "python3"):
            if words[1] == "-m":
                assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
            else:
                assert (ROOT / words[1]).is_file(), f"no file {words[1]}"
        else:
            assert shutil.which(words[0]), f"`{words[0]}` is not installed ({' '.join(words)})"


def test_variant_inspection_block_runs(tmp_path):
    block = next(b for b in BASH if "tunerd source" in b)
    exe = shutil.which("tunerd", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert exe, "the tunerd console script is not installed (pip install -e .)"
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(exe).parent), os.environ["PATH"]]))
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "@triton.jit" in (tmp_path / "variant.py").read_text()
    assert "compiles for sm_90" in r.stdout and "MMA" in r.stdout
