"""Shared fixtures: the project's stacks, loaded the way the CLI and the program load them."""

from __future__ import annotations

import copy
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STACKS = ROOT / "stacks"


def stack_document(name: str) -> dict[str, Any]:
    """A stack file as a mutable dict, to derive variants from in tests."""
    return copy.deepcopy(yaml.safe_load((STACKS / f"Pulumi.{name}.yaml").read_text()))


@pytest.fixture
def prod_document() -> dict[str, Any]:
    return stack_document("prod")


# ------------------------------------------------------------------------------------------------ labs


def leftovers(run_id: str) -> list[str]:
    """Anything of one lab run still on the machine: namespaces, processes, interfaces in the root namespace."""
    found = [f"namespace {n}" for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
             .stdout.split() if n.startswith(f"enc-{run_id}-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"root-namespace link {line.split(':')[1].strip()}" for line in links.splitlines() if run_id in line]
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.isdigit() and f"/{run_id}/" in cmdline:
            found.append(f"process {entry}: {cmdline}")
    return found


@pytest.fixture(scope="module")
def run_ids() -> Iterator[list[str]]:
    """Every lab this module starts registers here; when the module is done, none may have left anything."""
    ids: list[str] = []
    yield ids
    left = [item for run_id in ids for item in leftovers(run_id)]
    assert not left, f"labs left things behind: {left}"
