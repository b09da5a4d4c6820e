"""The names the Pulumi program gives its resources, without Pulumi: `enclave audit` prints them.

A drifted host's fix ends in `pulumi up --target '<urn>'` of that host's push resource (docs/operations.md). The
program (components/firewall.py) names the resource with `push_resource_name`, and `enclave audit` prints
`push_urn`; both come from here so the printed URN is the one the engine knows (tests/unit/test_program.py checks it
against the URNs the Pulumi mocks register).
"""

from __future__ import annotations

import re
from pathlib import Path

# Pulumi.yaml's `name:`, the project part of every URN
PULUMI_YAML = Path(__file__).resolve().parent.parent / "Pulumi.yaml"
# The component every resource of a stack is a child of (components/network.py registers it with this type)
NETWORK_TYPE = "enclave:index:EnclaveNetwork"
# A host's push: a pulumi-command local.Command, a child of the network, so its URN type is the parent chain
PUSH_RESOURCE_TYPE = f"{NETWORK_TYPE}$command:local:Command"
PUSH_SUFFIX = "-push"


def project_name(pulumi_yaml: Path = PULUMI_YAML) -> str:
    """The project's name as Pulumi.yaml sets it (`name: enclave`)."""
    match = re.search(r"^name:\s*(\S+)", pulumi_yaml.read_text(), re.M)
    if match is None:
        raise ValueError(f"{pulumi_yaml} has no `name:` line; Pulumi needs one (e.g. `name: enclave`)")
    return match.group(1)


def push_resource_name(droplet: str) -> str:
    """`prod-mysql-1` -> `prod-mysql-1-push`: the push's resource name (stable: URNs are built from it)."""
    return f"{droplet}{PUSH_SUFFIX}"


def push_urn(stack_name: str, droplet: str) -> str:
    """The URN of a host's push, as the engine records it and `pulumi up --target` takes it."""
    return f"urn:pulumi:{stack_name}::{project_name()}::{PUSH_RESOURCE_TYPE}::{push_resource_name(droplet)}"
