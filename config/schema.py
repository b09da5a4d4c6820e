"""The stack file's schema: loading what a user writes under `config:` with the `enclave:` prefix.

Two layers of checks, both before anything is created:
  1. pydantic validates shapes and values key by key (unknown keys, bad ports, bad CIDRs, negative counts…):
     the models are config/models.py, ports and services config/ports.py, and config/messages.py says
     pydantic's errors in the stack file's words;
  2. `check_references` (config/checks.py) validates what needs the whole stack (a `from` naming an unknown
     role, a VPC range too small for the hosts, operators missing while a bastion exists…).
A third layer needs the compiled policy and so lives beside the compiler: the limits on rules per host and set
members (enclave/limits.py), checked by `enclave` and the program right after this module accepts a stack.
Every problem becomes a `StackIssue` (config/issues.py) whose `path` is the key a user edits, e.g.
`enclave:roles.mysql.count`.

This module is where the rest of the program imports the stack's types from: it re-exports them, so the modules
above are an inside arrangement of config/. No Pulumi import here: the CLI, the lab and the Pulumi program all
load stacks through this module.

For users: docs/stack-file.md (every key, what is refused, the limits).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .checks import check_references
from .issues import NAMESPACE, StackError, StackIssue
from .messages import validation_issues
from .models import (
    HOSTNAME_LABEL,
    MAX_OPERATORS,
    MAX_RULES_PER_HOST,
    MAX_SET_MEMBERS,
    Egress,
    EgressEssentials,
    Ingress,
    Interfaces,
    NatGateway,
    PolicyTest,
    Role,
    StackConfig,
)
from .ports import PortSpec, stack_services

# The names the rest of the program imports from config.schema.
__all__ = [
    "MAX_OPERATORS",
    "MAX_RULES_PER_HOST",
    "MAX_SET_MEMBERS",
    "NAMESPACE",
    "SECRET_KEYS",
    "DROPLET_NAME_MAX",
    "Egress",
    "EgressEssentials",
    "Ingress",
    "Interfaces",
    "NatGateway",
    "PolicyTest",
    "PortSpec",
    "Role",
    "StackConfig",
    "StackError",
    "StackIssue",
    "droplet_name_issues",
    "enclave_keys",
    "load_config",
    "stack_name_issues",
]


# Keys that live in the stack file but are not part of the model: the SSH private keys (the current one and,
# while rotating, the previous one) are Pulumi secrets read by the program itself (never by the CLI, which
# cannot decrypt them).
SECRET_KEYS = frozenset({"sshPrivateKey", "sshPreviousPrivateKey"})


def load_config(values: dict[str, Any], source: str = "stack") -> StackConfig:
    """Validate the `enclave:` keys (prefix already removed) and return the stack, or raise StackError."""
    values = {k: v for k, v in values.items() if k not in SECRET_KEYS}
    try:
        stack = StackConfig.model_validate(values, context={"services": stack_services(values.get("services"))})
    except ValidationError as exc:
        raise StackError(validation_issues(exc, StackConfig), source) from None
    issues = check_references(stack)
    if issues:
        raise StackError(issues, source)
    return stack


# The longest DigitalOcean droplet name; droplets are named <stack>-<role>-<n>, which is also their hostname.
DROPLET_NAME_MAX = 63


def droplet_name_issues(stack_name: str, stack: StackConfig) -> list[StackIssue]:
    """Roles whose last droplet, `<stack>-<role>-<count>`, would have a name DigitalOcean refuses. It depends on
    the stack's name, so the program and `enclave plan --stack` check it after `load_config`."""
    issues = []
    for role_name, role in stack.roles.items():
        longest = f"{stack_name}-{role_name}-{role.count}"
        if len(longest) > DROPLET_NAME_MAX:
            issues.append(
                StackIssue(
                    f"{NAMESPACE}:roles.{role_name}",
                    f"droplet name {longest!r} is longer than {DROPLET_NAME_MAX} characters; shorten the role "
                    "or the stack name",
                )
            )
    return issues


def stack_name_issues(stack_name: str, stack: StackConfig | None, key: str = "(stack name)") -> list[StackIssue]:
    """Why `stack_name` cannot name a stack enclave builds, or []: it becomes part of droplet names, tags and the
    ssh config's `Host` aliases, so it is a hostname label. The program and the CLI call this same check."""
    shown = repr(stack_name) if len(stack_name) <= 80 else f"{stack_name[:60]!r}… ({len(stack_name)} characters)"
    if len(stack_name) > DROPLET_NAME_MAX - len("-r-1"):
        return [
            StackIssue(
                key,
                f"{shown} is {len(stack_name)} characters; droplets are named <stack>-<role>-<n>, at most "
                f"{DROPLET_NAME_MAX} characters, so a stack name has at most {DROPLET_NAME_MAX - len('-r-1')}",
            )
        ]
    if not HOSTNAME_LABEL.fullmatch(stack_name):
        return [
            StackIssue(
                key,
                f"{shown} becomes part of droplet host names and tags: use lower-case letters, digits and '-', "
                "not starting or ending with '-' (e.g. `pulumi stack rename prod`, or name the file "
                "Pulumi.prod.yaml)",
            )
        ]
    return droplet_name_issues(stack_name, stack) if stack else []


def enclave_keys(pulumi_config: dict[str, Any], source: str = "stack") -> dict[str, Any]:
    """The `enclave:*` entries of a stack file's `config:` map, prefix removed.

    Other namespaces (e.g. `digitalocean:token`) belong to providers and are left alone. A key without
    a namespace is rejected, because `pulumi config` would read it as `enclave:<key>` anyway.
    """
    out: dict[str, Any] = {}
    issues = []
    for key, value in pulumi_config.items():
        namespace, sep, name = str(key).partition(":")
        if not sep:
            issues.append(StackIssue(str(key), f"write it as {NAMESPACE}:{key} (stack config keys are namespaced)"))
        elif namespace == NAMESPACE:
            out[name] = value
    if issues:
        raise StackError(issues, source)
    return out
