"""The stack's `enclave:` configuration as the Pulumi CLI hands it to the program, checked by `config/`.

The CLI, the lab and this program validate a stack with the same `config.schema.load_config`, so a stack that
`enclave plan` accepts is exactly a stack `pulumi up` accepts. What only the program sees is handled here:

- Pulumi passes every config value as a string; maps and lists (`roles`, `operators`, `tests`, `interfaces`)
  arrive as JSON text and are decoded before validation.
- Every `enclave:` key is validated, so a misspelt key (`enclave:role`) is an error, not silently ignored.
- `enclave:sshPrivateKey` must exist and be a Pulumi secret; it is read with `require_secret` and only ever
  travels inside secret Outputs. `enclave:sshPreviousPrivateKey` (set only while rotating the key) likewise,
  when present.
- The pushes run `.venv/bin/python` relative to the project directory (components/firewall.py says why that is
  where pulumi-command runs them); the program runs in that same directory, so it checks the venv is there.
- The stack's limits (rules per host, set members; enclave/limits.py) and its own `tests` are checked on the
  compiled policy, as `enclave plan` checks them.
- With `enclave:cloudFirewall: true`, DigitalOcean's firewall limits are checked as the CLI checks them.

Anything wrong raises `InvalidStack` (a `pulumi.RunError`, which Pulumi prints without a traceback) naming every
key to fix, before the program registers a single resource.

For users: docs/stack-file.md and docs/operations.md#first-deploy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.runtime.config import CONFIG, get_config_env, is_config_secret

from config.schema import (
    NAMESPACE,
    StackConfig,
    StackError,
    StackIssue,
    enclave_keys,
    load_config,
    stack_name_issues,
)
from config.deployable import SECRET_CONFIG_KEYS, deployment_issues
from config.stackfile import Stack, stack_file_issues
from enclave.cloudfirewall import CloudFirewall, check_cloud_firewalls
from enclave.compiler import compile_policy
from enclave.limits import limit_issues
from enclave.plan import Plan, build_plan
from enclave.verify.stacktests import prove_tests
from enclave.pushrun import COMMAND

PRIVATE_KEY = "sshPrivateKey"
PREVIOUS_PRIVATE_KEY = "sshPreviousPrivateKey"


class InvalidStack(pulumi.RunError):
    """A stack that must not be deployed; the message lists every issue, each named by its key."""

    def __init__(self, error: StackError) -> None:
        self.issues = error.issues
        super().__init__(str(error))


@dataclass(frozen=True)
class StackSettings:
    """A validated stack, ready to build: its name, its model, its plan, its cloud firewalls (if enabled)
    and the SSH key (a secret Output), with the previous key while rotating (a secret Output, or None)."""

    name: str
    config: StackConfig
    plan: Plan
    cloud_firewalls: list[CloudFirewall]
    ssh_private_key: pulumi.Output[str]
    ssh_previous_private_key: pulumi.Output[str] | None = None


def _decode(value: Any) -> Any:
    # Pulumi serialises structured config values as JSON text; no scalar enclave key starts with { or [.
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # left as text: the schema then names the key and what it expects
    return value


def pulumi_config_values() -> dict[str, Any]:
    """Every config key of the running stack, fully qualified (`enclave:roles`, `digitalocean:token`, ...).

    `pulumi.Config` can only look keys up by name; to find misspelt keys we need the whole map, which the
    language host puts in PULUMI_CONFIG and the SDK copies into its runtime config (tests set it directly).
    """
    return {**get_config_env(), **CONFIG.get()}


def _private_key_issues(values: dict[str, Any], name: str = PRIVATE_KEY) -> list[StackIssue]:
    key = f"{NAMESPACE}:{name}"
    file = "~/.ssh/enclave-<stack>" + (".old" if name == PREVIOUS_PRIVATE_KEY else "")
    set_secret = f"pulumi config set --secret {key} < {file}"
    value = values.get(name)
    if value is None:
        if name == PREVIOUS_PRIVATE_KEY:
            return []  # only set while rotating
        return [StackIssue(key, f"required secret is missing; set it with `{set_secret}`")]
    problems = []
    if not is_config_secret(key):
        problems.append(StackIssue(key, f"is stored in plain text in the stack file; set it again with `{set_secret}`"))
    if not isinstance(value, str) or "PRIVATE KEY-----" not in value:
        # never echo the value: it may be a real key pasted in the wrong place
        problems.append(
            StackIssue(key, f"is not a private key file (-----BEGIN ... PRIVATE KEY-----); set it with `{set_secret}`")
        )
    return problems


def _token_issues() -> list[StackIssue]:
    """The DigitalOcean token, when set in the stack (rather than DIGITALOCEAN_TOKEN), must be a secret."""
    key = "digitalocean:token"
    if key not in pulumi_config_values() or is_config_secret(key):
        return []
    return [StackIssue(key, f"is stored in plain text; `pulumi config rm {key}`, then {SECRET_CONFIG_KEYS[key]}")]


def _push_command_issues() -> list[StackIssue]:
    interpreter = COMMAND.split()[0]
    if os.access(interpreter, os.X_OK):
        return []
    return [
        StackIssue(
            "(project directory)",
            f"{interpreter} is missing here ({os.getcwd()}); every host's push runs `{COMMAND}` from the project "
            "directory, where Pulumi.yaml is: run `make setup` there, and `pulumi up` from that checkout",
        )
    ]


def read_stack_settings(stack_name: str | None = None) -> StackSettings:
    """The running stack's settings, or `InvalidStack` before any resource exists."""
    name = stack_name or pulumi.get_stack()
    source = f"stack {name}"
    try:
        values = {key: _decode(value) for key, value in enclave_keys(pulumi_config_values(), source).items()}
    except StackError as exc:
        raise InvalidStack(exc) from None

    issues: list[StackIssue] = []
    config: StackConfig | None = None
    try:
        config = load_config(values, source)
    except StackError as exc:
        issues += exc.issues
    issues += stack_name_issues(name, config)
    issues += stack_file_issues(name)  # the stack file as written: refused if YAML versions read it differently
    issues += _private_key_issues(values)
    issues += _private_key_issues(values, PREVIOUS_PRIVATE_KEY)
    issues += _token_issues()
    issues += _push_command_issues()
    if not issues and config is not None:
        # placeholders and a public key that is not the private key's: only a deployment cannot use them
        issues += deployment_issues(name, config, values.get(PRIVATE_KEY))
    if issues or config is None:
        raise InvalidStack(StackError(issues, source))
    issues = limit_issues(compile_policy(config))  # rules per host, set members: counted as rendered
    if issues:
        raise InvalidStack(StackError(issues, source))

    plan = build_plan(Stack(name, config))
    failed = [
        StackIssue(f"{NAMESPACE}:tests[{t.index}]", f"{t.describe()}, but the compiled policy says {t.seen}: {t.detail}")
        for t in plan.tests if not t.passed
    ]
    # every test proved for every packet against the rules the hosts will get, as `enclave plan` does
    failed += [
        StackIssue(f"{NAMESPACE}:tests[{p.index}]",
                   f"{p.describe()}, but the rules make it {p.seen} for some packets, e.g. {p.counterexample}")
        for p in prove_tests(plan.policy, plan.addresses, plan.files) if not p.passed
    ]
    if failed:
        raise InvalidStack(StackError(failed, source))
    try:
        firewalls = check_cloud_firewalls(name, plan.policy)
    except StackError as exc:
        raise InvalidStack(exc) from None
    project = pulumi.Config(NAMESPACE)
    return StackSettings(
        name, config, plan, firewalls, project.require_secret(PRIVATE_KEY), project.get_secret(PREVIOUS_PRIVATE_KEY)
    )
