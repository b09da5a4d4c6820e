"""Runs the real Pulumi program (`__main__.py`) under the SDK's mocks and records what it registers.

No Pulumi CLI or provider plugin is involved: `pulumi.runtime.set_mocks` replaces the engine, and
`RecordingMonitor` keeps each registration exactly as the engine would receive it (secrets still wrapped,
dependencies, ignore_changes). Mocked droplets get deterministic addresses from their names, so two runs of
different stack versions can be compared resource by resource.

Each run starts from a copy of the pristine context captured at import, with the runtime options reset and a
new root stack, so runs in one process cannot see each other's config, resources or outputs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import gc
import hashlib
import ipaddress
import json
import logging
import runpy
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import mocks
from pulumi.runtime.rpc import _special_secret_sig, _special_sig_key
from pulumi.runtime.settings import get_root_resource, reset_options
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from config.deployable import DOCUMENTATION_NETWORKS, PLACEHOLDER_KEY_MARK
from config.schema import StackConfig, StackError, load_config
from enclave.compiler import Addresses
from enclave.resource_names import project_name

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "__main__.py"
PROJECT = project_name()  # as the engine does: Pulumi.yaml's `name:`, the project part of every URN
PRISTINE = contextvars.copy_context()



def _keypair(comment: str) -> tuple[str, str]:
    """A fresh ed25519 key pair (private, public) made by ssh-keygen for this test process: the program derives
    the public key from the private one and refuses a mismatch, so the tests need a real pair."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
        return path.read_text(), path.with_suffix(".pub").read_text().strip()


TEST_PRIVATE_KEY, TEST_PUBLIC_KEY = _keypair("test@enclave")
SECRET_KEYS = ["enclave:sshPrivateKey", "enclave:sshPreviousPrivateKey", "digitalocean:token"]
# An operator address that is not in a documentation range (the program refuses those: nobody's machine).
TEST_OPERATOR = "100.64.0.7/32"


def deployable(document: dict[str, Any]) -> dict[str, Any]:
    """The shipped stack made deployable as an operator's own would be: the test key pair's public key in place
    of the example key, TEST_OPERATOR in place of documentation operator addresses."""
    config = dict(document["config"])
    if PLACEHOLDER_KEY_MARK in base64.b64decode(str(config.get("enclave:sshPublicKey", "x AA==")).split()[1]):
        config["enclave:sshPublicKey"] = TEST_PUBLIC_KEY
    operators = config.get("enclave:operators")
    if isinstance(operators, list):
        config["enclave:operators"] = [
            TEST_OPERATOR if any(ipaddress.ip_network(str(o)).subnet_of(d)  # type: ignore[arg-type]
                                 for d in DOCUMENTATION_NETWORKS if d.version == ipaddress.ip_network(str(o)).version)
            else o for o in operators]
    return {**document, "config": config}


def pulumi_config(document: dict[str, Any], private_key: str | None = TEST_PRIVATE_KEY,
                  as_shipped: bool = False) -> dict[str, str]:
    """A stack file's `config:` as the Pulumi CLI passes it to a program: strings, maps and lists as JSON.
    Made `deployable` unless `as_shipped` (the placeholders the program refuses left in)."""
    if not as_shipped:
        document = deployable(document)
    out: dict[str, str] = {"digitalocean:token": "dop_v1_test"}
    for key, value in document["config"].items():
        if isinstance(value, (dict, list)):
            out[key] = json.dumps(value)
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        else:
            out[key] = str(value)
    if private_key is not None:
        out.setdefault("enclave:sshPrivateKey", private_key)  # unless the document sets its own
    return out


def enclave_config(config: dict[str, str]) -> StackConfig:
    """The stack model of a CLI-style config map (the tests' own view, for computing expectations)."""
    values = {k.partition(":")[2]: v for k, v in config.items() if k.startswith("enclave:")}
    values.pop("sshPrivateKey", None)
    for key, value in values.items():
        if value[:1] in "{[":
            values[key] = json.loads(value)
    return load_config(values)


# A bastion's public address, as the program uses it, is its reserved IP; the mocks give the droplet itself the
# address RESERVED_OFFSET below it, so a test can tell which one the program dialed.
RESERVED_OFFSET = 1 << 16
RESERVED_RANGE = ipaddress.ip_network("198.19.0.0/16")


def mocked_addresses(stack_name: str, stack: StackConfig) -> dict[str, Addresses]:
    """Addresses the mocks give droplet `<stack>-<role>-<n>`, as the program uses them: fixed by role position and
    n, whatever the counts; a bastion's public one is its reserved IP; a private role's (`public: false`) none."""
    out = {}
    for position, (role_name, role) in enumerate(stack.roles.items()):
        for n in range(1, 17):
            slot = 16 * position + n
            public = ipaddress.ip_address("198.18.0.0") + slot + (RESERVED_OFFSET if role.bastion else 0)
            out[f"{stack_name}-{role_name}-{n}"] = Addresses(
                public=str(public) if role.public else None,
                private=str(stack.vpc_ip_range.network_address + 1 + slot),
                public6=str(ipaddress.ip_address("2001:db8:e0::") + slot) if role.ipv6 else None,
            )
    return out


def droplet_public(address: Addresses) -> str | None:
    """The public address the mocks give the droplet itself: a bastion's is RESERVED_OFFSET below its reserved IP."""
    own = address.public
    if own is not None and ipaddress.ip_address(own) in RESERVED_RANGE:
        own = str(ipaddress.ip_address(own) - RESERVED_OFFSET)
    return own


@dataclass
class Registration:
    """One resource as the engine received it."""

    type: str
    name: str
    urn: str
    id: str
    parent: str
    inputs: dict[str, Any]  # deserialised; secrets stay wrapped ({sig: secret, value: ...})
    dependencies: list[str]
    ignore_changes: list[str]


class RecordingMonitor(mocks.MockMonitor):
    def __init__(self, mock: mocks.Mocks) -> None:
        super().__init__(mock)
        self.registrations: list[Registration] = []

    def RegisterResource(self, request: Any) -> Any:  # noqa: N802 (the gRPC method name)
        response = super().RegisterResource(request)  # type: ignore[no-untyped-call]  # the SDK leaves it untyped
        if request.type != "pulumi:pulumi:Stack":
            inputs = pulumi.runtime.rpc.deserialize_properties(request.object)
            self.registrations.append(
                Registration(
                    request.type,
                    request.name,
                    response.urn,
                    response.id,
                    request.parent,
                    inputs,
                    list(request.dependencies),
                    list(request.ignoreChanges),
                )
            )
        return response


class DropletMocks(mocks.Mocks):
    """Provider stand-ins: ids from names, droplet addresses from `mocked_addresses`."""

    def __init__(self, addresses: dict[str, Addresses]) -> None:
        self.addresses = addresses

    def new_resource(self, args: mocks.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        state = dict(args.inputs)
        if args.typ == "digitalocean:index/droplet:Droplet" and args.inputs["name"] in self.addresses:
            # (in a preview, a droplet left out of `addresses` is one still to be created: its addresses unknown)
            a = self.addresses[args.inputs["name"]]
            # the provider reads a droplet without public networking as ipv4Address ""
            state.update(ipv4Address=droplet_public(a) or "", ipv4AddressPrivate=a.private)
            if args.inputs.get("ipv6"):
                state["ipv6Address"] = a.public6
        elif args.typ == "digitalocean:index/reservedIp:ReservedIp":
            droplet = args.name.removesuffix("-ip")
            if droplet in self.addresses:  # (in a preview, unknown while its droplet is to be created)
                state["ipAddress"] = self.addresses[droplet].public
        elif args.typ == "digitalocean:index/vpcNatGateway:VpcNatGateway":
            state["vpcs"] = [{**vpc, "gatewayIp": "10.0.0.254"} for vpc in args.inputs["vpcs"]]
        elif args.typ == "digitalocean:index/sshKey:SshKey":
            state["fingerprint"] = "3b:16:e4:bf:8b:00:8b:b8:59:8c:a9:d3:f0:19:fa:45"
        elif args.typ == "command:local:Command":
            # what pushrun prints once the host confirmed; the environment (the keys) is not echoed back
            stdin = args.inputs.get("stdin")
            state = {"stdout": "", "stderr": ""}
            if isinstance(stdin, str):  # (unknown in a preview until the droplets it names exist)
                request = json.loads(stdin)
                via = request["bastions"][0] if request["bastions"] else None
                state["stdout"] = json.dumps({"host": request["host"], "digest": "mock", "via": via})
        if args.typ == "digitalocean:index/droplet:Droplet":  # droplet ids are numbers (firewalls use them)
            return str(int(hashlib.sha256(args.name.encode()).hexdigest()[:8], 16)), state
        return f"{args.name}-id", state

    def call(self, args: mocks.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, None


@dataclass
class ProgramRun:
    stack_name: str
    config: dict[str, str]
    registrations: list[Registration]
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: set[str] = field(default_factory=set)
    error: BaseException | None = None
    log: list[str] = field(default_factory=list)

    def of_type(self, typ: str) -> list[Registration]:
        return [r for r in self.registrations if r.type == typ]

    def by_name(self, typ: str) -> dict[str, Registration]:
        return {r.name: r for r in self.of_type(typ)}


class _Capture(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _run(
    stack_name: str,
    config: dict[str, str],
    secret_keys: list[str],
    addresses: dict[str, Addresses],
    preview: bool,
    cwd: Path,
) -> ProgramRun:
    reset_options(project=PROJECT, stack=stack_name)
    pulumi.runtime.set_all_config(config, secret_keys)
    monitor = RecordingMonitor(DropletMocks(addresses))
    run = ProgramRun(stack_name, config, monitor.registrations)
    logger = logging.getLogger(f"enclave-test-{id(run)}")
    logger.addHandler(_Capture(run.log))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    mocks.set_mocks(monitor.mocks, project=PROJECT, stack=stack_name, preview=preview, logger=logger, monitor=monitor)

    def program() -> None:
        # The engine runs the program (and starts pulumi-command) in the project directory; the program checks
        # the push command's interpreter there.
        with contextlib.chdir(cwd):
            runpy.run_path(str(PROGRAM), run_name="__main__")

    thresholds = gc.get_threshold()  # __main__ tunes the GC for its own process; this one runs many programs
    try:
        _sync_await(run_pulumi_func(program))
    except Exception as exc:  # the program's own error is the result under test
        run.error = exc
        return run
    finally:
        gc.set_threshold(*thresholds)
    root = get_root_resource()
    assert root is not None
    for key, value in root.outputs.items():  # type: ignore[attr-defined]
        output = pulumi.Output.from_input(value)
        run.outputs[key] = _sync_await(output.future())
        if _sync_await(output.is_secret()):
            run.secret_outputs.add(key)
    return run


def _run_in_own_loop(*args: Any) -> ProgramRun:
    # Each run gets a new event loop (another test's asyncio.run() may have left none), closed afterwards.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return _run(*args)
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def run_program(
    stack_name: str,
    config: dict[str, str],
    secret_keys: list[str] | None = None,
    addresses: dict[str, Addresses] | None = None,
    preview_creating: set[str] | None = None,
    cwd: Path = ROOT,
) -> ProgramRun:
    """Run `__main__.py` for one stack under mocks, in a fresh copy of the pristine runtime context.

    `preview_creating` makes it a `pulumi preview` in which these droplets are still to be created, so their
    addresses are unknown (every other droplet exists, with its addresses known from the state). `cwd`: where
    the engine would run it (the project directory, unless a test says otherwise).
    """
    if addresses is None:
        try:
            addresses = mocked_addresses(stack_name, enclave_config(config))
        except StackError:
            addresses = {}  # a stack the program must refuse: no droplet should ever ask for an address
    if preview_creating is not None:
        addresses = {name: a for name, a in addresses.items() if name not in preview_creating}
    keys = SECRET_KEYS if secret_keys is None else secret_keys
    preview = preview_creating is not None
    return PRISTINE.copy().run(_run_in_own_loop, stack_name, config, keys, addresses, preview, cwd)


def stack_config_map(name: str) -> dict[str, str]:
    document = yaml.safe_load((ROOT / "stacks" / f"Pulumi.{name}.yaml").read_text())
    return pulumi_config(document)


def is_unknown(value: Any) -> bool:
    """A value the engine will only know after `pulumi up` (shown as a change by `pulumi preview`)."""
    return isinstance(value, pulumi.output.Unknown)


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(_special_sig_key) == _special_secret_sig


def plain_strings(value: Any) -> list[str]:
    """Every string in a recorded value outside secret wrappers: what would be stored or shown in clear."""
    if is_secret(value):
        return []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *plain_strings(v)]]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in plain_strings(v)]
    return [value] if isinstance(value, str) else []
