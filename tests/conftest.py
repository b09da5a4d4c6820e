"""Shared fixtures: the project's stacks, loaded the way the CLI and the program load them."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.stackfile import Stack, load_stack_file
from enclave.lab.lab import Lab
from enclave.lab.probe import Outcome, plan_probes, send_probes

ROOT = Path(__file__).resolve().parent.parent
STACKS = ROOT / "stacks"


def stack_document(name: str) -> dict[str, Any]:
    """A stack file as a mutable dict, to derive variants from in tests."""
    return copy.deepcopy(yaml.safe_load((STACKS / f"Pulumi.{name}.yaml").read_text()))


@pytest.fixture
def prod_document() -> dict[str, Any]:
    return stack_document("prod")


@pytest.fixture(scope="module")
def dev6(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """dev with haproxy-www on IPv6: a public service the Internet reaches over IPv6."""
    doc = stack_document("dev")
    doc["config"]["enclave:roles"]["haproxy-www"]["ipv6"] = True
    path = tmp_path_factory.mktemp("stacks") / "Pulumi.dev6.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_stack_file(path)


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


@contextlib.contextmanager
def pushed_lab(stack: Stack, run_ids: list[str], **options: Any) -> Iterator[Lab]:
    """A lab of `stack` with every host pushed and confirmed (Lab's keyword options passed on)."""
    with Lab(stack, **options) as lab:
        run_ids.append(lab.run_id)
        failures = lab.push_all()
        assert not failures, [str(f) for f in failures.values()]
        yield lab


def send_one(lab: Lab, source: str, host: str, kind: str, port: str) -> Outcome:
    """One of the lab's probes (the same packet `lab check` sends), from `source`'s agent."""
    (probe,) = [
        p for p in plan_probes(lab.policy, lab.addresses, lab.others).probes
        if (p.source.name, p.target.host, p.target.kind, str(p.port)) == (source, host, kind, port)
    ]
    (outcome,) = send_probes({source: str(lab.agent_socket(source))}, [probe])
    return outcome
