"""A fresh clone installed Pulumi's way gets the locked dependencies (issue 22.4).

Pulumi.yaml says `toolchain: pip`, `virtualenv: .venv`. The Python language host then builds the venv itself
(pulumi/pulumi sdk/python/toolchain/pip.go InstallDependencies: `python3 -m venv .venv`, `pip install --upgrade
pip setuptools wheel`, then `pip install -r requirements.txt` only if that file exists) and discovers plugins with
`python -m pip list` in it. So requirements.txt must exist, hold exactly uv.lock's runtime packages, and the venv
must keep pip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
VENV = ROOT / ".venv"


def exported() -> str:
    """`make requirements`'s command, printed instead of written."""
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(VENV), "UV_PYTHON_DOWNLOADS": "never", "UV_OFFLINE": "1"}
    done = subprocess.run([str(VENV / "bin" / "uv"), "export", "--frozen", "--no-dev", "--no-emit-project", "-q"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def requirement_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]  # the header names the command's flags


def test_pulumi_yaml_installs_with_pip_into_the_venv() -> None:
    options = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["runtime"]["options"]
    assert options == {"toolchain": "pip", "virtualenv": ".venv"}


def test_requirements_txt_is_uv_lock_exported() -> None:
    assert requirement_lines((ROOT / "requirements.txt").read_text()) == requirement_lines(exported()), (
        "requirements.txt differs from uv.lock: run `make requirements` and commit it")


def test_requirements_txt_pins_every_runtime_package_of_uv_lock_with_hashes() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    runtime: set[str] = set()
    todo = [d["name"] for d in packages["enclave"]["dependencies"]]
    while todo:  # the project's dependencies, transitively (the dev group excluded)
        name = todo.pop()
        if name not in runtime:
            runtime.add(name)
            todo += [d["name"] for d in packages[name].get("dependencies", [])]
    text = (ROOT / "requirements.txt").read_text()
    pinned = {line.split("==")[0]: line.split("==")[1].split()[0] for line in requirement_lines(text)
              if "==" in line and not line.startswith(" ")}
    assert {"pulumi", "pulumi-command", "pulumi-digitalocean", "pydantic", "pyyaml"} <= runtime
    for name in runtime:
        assert pinned.get(name) == packages[name]["version"], name
    assert "--hash=sha256:" in text
    assert not {"pytest", "mypy", "hypothesis"} & set(pinned)  # dev tools are not the program's


def test_the_venv_keeps_pip_and_already_satisfies_requirements_txt() -> None:
    """The language host's step, offline: pip in .venv (which `make setup` built) reads requirements.txt in
    hash-checking mode and finds every pin already installed, so `pulumi install` there changes nothing."""
    python = VENV / "bin" / "python"
    assert subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, timeout=60).returncode == 0, (
        "pip is missing from .venv: Pulumi's plugin discovery runs `python -m pip list` there")
    done = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--disable-pip-version-check",
                           "-r", str(ROOT / "requirements.txt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Would install" not in done.stdout, done.stdout[-2000:]
    assert sys.version_info >= (3, 11)
