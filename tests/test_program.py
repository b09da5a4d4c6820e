"""The Pulumi program under the SDK's mocks: what `pulumi up` would create, push and export for a stack.

Each test runs the real `__main__.py` (tests/pulumi_harness.py) and checks the registrations the engine would
receive, against the core (compile_policy, Renderer, push_script, ssh_config, build_plan) for the mocked
addresses.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from config.schema import StackError
from config.stackfile import Stack
from enclave.cloudfirewall import cloud_firewalls, role_tag
from enclave.compiler import compile_policy
from enclave.plan import build_plan, droplet_name
from enclave.push import cloud_config, confirm_script, push_script
from enclave.render import Renderer, baseline_files
from enclave.sshconfig import jump_host, ssh_config

from .conftest import stack_document
from .pulumi_harness import (
    TEST_PRIVATE_KEY,
    ProgramRun,
    Registration,
    enclave_config,
    is_secret,
    is_unknown,
    mocked_addresses,
    plain_strings,
    pulumi_config,
    run_program,
    stack_config_map,
)

NETWORK = "enclave:index:EnclaveNetwork"
PUSH = "enclave:index:FirewallPush"
VPC = "digitalocean:index/vpc:Vpc"
SSH_KEY = "digitalocean:index/sshKey:SshKey"
DROPLET = "digitalocean:index/droplet:Droplet"
COMMAND = "command:remote:Command"
FIREWALL = "digitalocean:index/firewall:Firewall"


def run_ok(stack_name: str, config: dict[str, str]) -> ProgramRun:
    run = run_program(stack_name, config)
    assert run.error is None, run.error
    return run


def connection(command: Registration) -> dict[str, Any]:
    value = command.inputs["connection"]
    assert is_secret(value), f"{command.name}: the connection holds the private key and must be a secret"
    inner: dict[str, Any] = value["value"]
    return inner


def host_of(command_name: str, stack_name: str = "prod") -> str:
    """`prod-mysql-1-apply` / `prod-mysql-1-confirm` -> `mysql-1`."""
    return command_name.removeprefix(f"{stack_name}-").removesuffix("-apply").removesuffix("-confirm")


def config_with(name: str, edit: Any) -> dict[str, str]:
    document = stack_document(name)
    edit(document["config"])
    return pulumi_config(document)


# ------------------------------------------------------------------------------------------ resources


@pytest.mark.parametrize("stack_name", ["dev", "prod"])
def test_resources_for_each_stack(stack_name: str) -> None:
    """One VPC, one key, a droplet and a firewall push per host, all inside the stack's EnclaveNetwork."""
    config = stack_config_map(stack_name)
    stack = enclave_config(config)
    policy = compile_policy(stack)
    run = run_ok(stack_name, config)

    counts: dict[str, int] = {}
    for r in run.registrations:
        counts[r.type] = counts.get(r.type, 0) + 1
    n = len(policy.hosts)
    assert n == sum(role.count for role in stack.roles.values())
    assert counts == {NETWORK: 1, VPC: 1, SSH_KEY: 1, DROPLET: n, PUSH: n, COMMAND: 2 * n}  # apply + confirm

    network = run.of_type(NETWORK)[0]
    for r in run.registrations:
        if r.type in (VPC, SSH_KEY, DROPLET, PUSH):
            assert r.parent == network.urn, r.name
    pushes = run.by_name(PUSH)
    for command in run.of_type(COMMAND):
        push_name = command.name.removesuffix("-apply").removesuffix("-confirm")
        assert command.parent == pushes[push_name].urn

    vpc = run.of_type(VPC)[0].inputs
    assert vpc["ipRange"] == str(stack.vpc_ip_range) and vpc["region"] == stack.region
    key = run.of_type(SSH_KEY)[0].inputs
    assert key["publicKey"] == stack.ssh_public_key

    droplets = run.by_name(DROPLET)
    assert set(droplets) == {droplet_name(stack_name, h) for h in policy.hosts}
    for host in policy.hosts:
        role = stack.roles[host.role]
        d = droplets[droplet_name(stack_name, host)]
        assert d.inputs["name"] == f"{stack_name}-{host.role}-{host.index}"
        assert d.inputs["size"] == role.size and d.inputs["image"] == (role.image or stack.image)
        assert d.inputs["region"] == stack.region
        assert d.inputs["vpcUuid"] == f"enclave-{stack_name}-id"  # the mocked id of this stack's Vpc
        assert d.inputs["ipv6"] is role.ipv6
        assert len(d.inputs["sshKeys"]) == 1 and ":" in d.inputs["sshKeys"][0]  # the SshKey's fingerprint
        assert d.inputs["tags"][:3] == ["enclave", f"enclave-{stack_name}", f"enclave-{stack_name}-{host.role}"]
        assert d.inputs["tags"][3:] == role.tags
        # droplets boot closed: cloud-init applies the role's baseline, which names no peer
        assert d.inputs["userData"] == cloud_config(baseline_files(stack, host.role))
        # a new cloud-init baseline (or key) applies to new droplets, never rebuilds running ones
        assert "userData" in d.ignore_changes


@pytest.mark.parametrize("stack_name", ["dev", "prod"])
def test_each_push_reaches_its_host_through_the_bastion_with_the_compilers_rules(stack_name: str) -> None:
    config = stack_config_map(stack_name)
    stack = enclave_config(config)
    policy = compile_policy(stack)
    addresses = mocked_addresses(stack_name, stack)
    known = {h.name: addresses[droplet_name(stack_name, h)] for h in policy.hosts}
    renderer = Renderer(policy, known, stack_name)
    run = run_ok(stack_name, config)

    jump = jump_host(policy)
    assert jump is not None and jump.role == "tunnel"
    commands = run.by_name(COMMAND)
    jump_push = commands[f"{droplet_name(stack_name, jump)}-apply"]
    for host in policy.hosts:
        command = commands[f"{droplet_name(stack_name, host)}-apply"]
        conn = connection(command)
        assert command.inputs["create"] == "sh -s"  # sshUser root
        assert command.inputs["stdin"] == push_script(renderer.render(host), stack_name)
        # the confirmation: its own resource (a new SSH connection), same target, only after the apply
        confirm = commands[f"{droplet_name(stack_name, host)}-confirm"]
        assert confirm.inputs["stdin"] == confirm_script(renderer.render(host), stack_name)
        assert connection(confirm) == conn and command.urn in confirm.dependencies
        assert conn["user"] == stack.ssh_user and conn["privateKey"] == TEST_PRIVATE_KEY
        assert conn["dialErrorLimit"] >= 20 and conn["perDialTimeout"] >= 10  # droplets take a while to boot
        if stack.roles[host.role].bastion:
            assert conn["host"] == known[host.name].public and "proxy" not in conn
            assert jump_push.urn not in command.dependencies
        else:
            assert conn["host"] == known[host.name].private
            proxy = conn["proxy"]
            assert proxy["host"] == known[jump.name].public
            assert proxy["user"] == stack.ssh_user and proxy["privateKey"] == TEST_PRIVATE_KEY
            assert proxy["dialErrorLimit"] >= 20
            assert jump_push.urn in command.dependencies, f"{host.name} is pushed before its bastion"
            # the bastion's rules are confirmed before anything goes through it
            jump_confirm = commands[f"{droplet_name(stack_name, jump)}-confirm"]
            assert jump_confirm.urn in command.dependencies, f"{host.name} is pushed before its bastion is confirmed"


def test_without_a_bastion_every_host_is_pushed_on_its_public_address() -> None:
    def no_bastion(config: dict[str, Any]) -> None:
        config["enclave:roles"]["tunnel"]["bastion"] = False
        config["enclave:tests"] = []

    config = config_with("dev", no_bastion)
    policy = compile_policy(enclave_config(config))
    addresses = mocked_addresses("dev", enclave_config(config))
    renderer = Renderer(policy, {h.name: addresses[f"dev-{h.name}"] for h in policy.hosts}, "dev")
    run = run_ok("dev", config)
    commands = run.by_name(COMMAND)
    assert len(commands) == 2 * len(policy.hosts)
    for host in policy.hosts:
        command = commands[f"dev-{host.name}-apply"]
        conn = connection(command)
        assert conn["host"] == addresses[f"dev-{host.name}"].public and "proxy" not in conn
        # tunnel-1 now names no peer in its rules: its script is rendered without waiting for any address
        assert command.inputs["stdin"] == push_script(renderer.render(host), "dev")
        assert not [d for d in command.dependencies if d.endswith("-apply")]  # no push waits for another
    assert run.outputs["bastion"] is None


def test_scalar_settings_and_a_non_root_login() -> None:
    """Top-level scalars arrive as strings (logDrops "true"); a non-root sshUser pushes through sudo."""

    def admin(config: dict[str, Any]) -> None:
        config["enclave:sshUser"] = "admin"
        config["enclave:logDrops"] = True

    config = config_with("dev", admin)
    assert config["enclave:logDrops"] == "true"
    run = run_ok("dev", config)
    for command in run.of_type(COMMAND):
        assert command.inputs["create"] == "sudo -n sh -s"
        assert connection(command)["user"] == "admin"
        if command.name.endswith("-apply"):  # the rules travel with the apply; confirm names their digest
            assert 'LOG --log-prefix "enclave-drop: "' in command.inputs["stdin"]
    assert "User admin" in run.outputs["sshConfig"]


def test_cloud_firewalls_when_enabled() -> None:
    """One DigitalOcean firewall per role, as enclave.cloudfirewall specifies, created after the droplets."""

    def enable(config: dict[str, Any], wordpress: int = 2) -> None:
        config["enclave:cloudFirewall"] = True
        config["enclave:roles"]["wordpress"]["count"] = wordpress
        config["enclave:roles"]["mysql"]["ingress"].append({"from": "mysql-2", "ports": ["tcp/4567"]})

    config = config_with("prod", enable)
    stack = enclave_config(config)
    specs = {fw.name: fw for fw in cloud_firewalls("prod", compile_policy(stack))}
    run = run_ok("prod", config)
    firewalls = run.by_name(FIREWALL)
    assert set(firewalls) == set(specs) == {f"enclave-prod-{role}" for role in stack.roles}

    droplets = run.by_name(DROPLET)
    for name, firewall in firewalls.items():
        spec = specs[name]
        assert firewall.parent == run.of_type(NETWORK)[0].urn
        assert firewall.inputs["tags"] == list(spec.tags) == [role_tag("prod", spec.role)]
        rules = firewall.inputs["inboundRules"]
        assert len(rules) == len(spec.inbound_rules)
        for got, want in zip(rules, spec.inbound_rules):
            assert got["protocol"] == want.protocol and got.get("portRange") == want.port_range
            assert got.get("sourceAddresses", []) == list(want.source_addresses)
            assert got.get("sourceTags", []) == list(want.source_tags)
            assert got.get("sourceDropletIds", []) == [int(droplets[f"prod-{h}"].id) for h in want.source_hosts]
        assert len(firewall.inputs["outboundRules"]) == len(spec.outbound_rules)
        assert {d.urn for d in droplets.values()} <= set(firewall.dependencies)  # tags exist once droplets do
    assert any(r.get("sourceDropletIds") for r in firewalls["enclave-prod-mysql"].inputs["inboundRules"])
    for droplet in droplets.values():
        role = droplet.name.removeprefix("prod-").rpartition("-")[0]
        assert role_tag("prod", role) in droplet.inputs["tags"]

    scaled = run_ok("prod", config_with("prod", lambda c: enable(c, wordpress=3))).by_name(FIREWALL)
    assert {n: f.inputs for n, f in scaled.items()} == {n: f.inputs for n, f in firewalls.items()}


# -------------------------------------------------------------------------------------------- outputs


def test_outputs_hosts_bastion_ssh_config_and_flows() -> None:
    config = stack_config_map("prod")
    stack = enclave_config(config)
    policy = compile_policy(stack)
    addresses = mocked_addresses("prod", stack)
    known = {h.name: addresses[droplet_name("prod", h)] for h in policy.hosts}
    run = run_ok("prod", config)

    assert run.outputs["hosts"] == {
        h.name: {
            "role": h.role,
            "droplet": f"prod-{h.name}",
            "public": known[h.name].public,
            "private": known[h.name].private,
            "public6": known[h.name].public6,
        }
        for h in policy.hosts
    }
    assert run.outputs["hosts"]["mysql-1"]["public6"] and run.outputs["hosts"]["wordpress-1"]["public6"] is None
    assert run.outputs["bastion"] == known["tunnel-1"].public
    ssh = run.outputs["sshConfig"]
    assert ssh == ssh_config("prod", policy, known, "root", identity_file="~/.ssh/enclave-prod")
    assert f"Host prod-mysql-1\n  HostName {known['mysql-1'].private}" in ssh and "ProxyJump prod-tunnel-1" in ssh
    plan = build_plan(Stack("prod", stack), known)
    assert run.outputs["flows"] == plan.to_json()["flows"]
    assert any(f["from"] == "wordpress" and f["to"] == "mysql" and f["ports"] == ["tcp/3306"] for f in run.outputs["flows"])


def test_the_private_key_stays_secret() -> None:
    run = run_ok("prod", stack_config_map("prod"))
    commands = run.of_type(COMMAND)
    assert commands
    for command in commands:
        connection(command)  # wrapped as a secret when it reaches the engine
    for r in run.registrations:
        assert not any(TEST_PRIVATE_KEY.strip() in s for s in plain_strings(r.inputs)), r.name
    assert TEST_PRIVATE_KEY.strip() not in json.dumps(run.outputs)
    assert not any("PRIVATE KEY" in line for line in run.log)


# -------------------------------------------------------------------------------------------- scaling


def _wordpress(count: int) -> dict[str, str]:
    return config_with("prod", lambda c: c["enclave:roles"]["wordpress"].update(count=count))


def _mysql(count: int) -> dict[str, str]:
    return config_with("prod", lambda c: c["enclave:roles"]["mysql"].update(count=count))


@pytest.mark.parametrize(
    ("scale", "changed"),
    [
        # accept from wordpress (mysql, wordpress's own gluster ports) or send to it (restricted haproxy)
        (_wordpress, {"haproxy-www-1", "wordpress-1", "wordpress-2", "mysql-1", "mysql-2"}),
        (_mysql, {"mysql-1", "mysql-2"}),  # only mysql accepts from mysql; nobody restricted sends to it
    ],
    ids=["wordpress", "mysql"],
)
def test_scaling_2_to_3_is_additive_and_re_pushes_only_hosts_whose_peers_changed(
    scale: Any, changed: set[str]
) -> None:
    before, after = run_ok("prod", scale(2)), run_ok("prod", scale(3))
    role = "wordpress" if scale is _wordpress else "mysql"

    old, new = before.by_name(DROPLET), after.by_name(DROPLET)
    assert set(new) - set(old) == {f"prod-{role}-3"} and set(old) <= set(new)  # 3 -> 2 removes the highest
    for name in old:
        assert new[name].inputs == old[name].inputs, f"{name} would be updated or replaced"
    for typ in (VPC, SSH_KEY):
        assert after.of_type(typ)[0].inputs == before.of_type(typ)[0].inputs

    old_push, new_push = before.by_name(COMMAND), after.by_name(COMMAND)
    assert set(new_push) - set(old_push) == {f"prod-{role}-3-apply", f"prod-{role}-3-confirm"}
    re_pushed = {host_of(n) for n in old_push if new_push[n].inputs != old_push[n].inputs}
    assert re_pushed == changed
    for n in old_push:  # apply and confirm of a host change together, or not at all
        twin = n.replace("-apply", "-confirm") if n.endswith("-apply") else n.replace("-confirm", "-apply")
        assert (new_push[n].inputs != old_push[n].inputs) == (new_push[twin].inputs != old_push[twin].inputs)

    # the same answer from the core: the hosts whose rendered rules differ between the two stacks
    def rules(config: dict[str, str]) -> dict[str, str]:
        stack = enclave_config(config)
        policy = compile_policy(stack)
        addresses = mocked_addresses("prod", stack)
        renderer = Renderer(policy, {h.name: addresses[f"prod-{h.name}"] for h in policy.hosts}, "prod")
        return {h.name: push_script(renderer.render(h), "prod") for h in policy.hosts}

    rules_before, rules_after = rules(scale(2)), rules(scale(3))
    assert {h for h in rules_before if rules_before[h] != rules_after[h]} == changed

    # Unchanged pushes do not even depend on the new droplet, so `pulumi preview` (where its addresses are
    # still unknown) shows them unchanged too.
    new_droplet = new[f"prod-{role}-3"].urn
    for name, command in new_push.items():
        host = host_of(name)
        assert (new_droplet in command.dependencies) == (host in changed or host == f"{role}-3"), name


def test_preview_of_scaling_shows_only_the_pushes_that_will_change() -> None:
    """In `pulumi preview` the new droplet's addresses are unknown: only pushes that need them are unknown."""
    applied = run_ok("prod", _wordpress(2)).by_name(COMMAND)
    preview = run_program("prod", _wordpress(3), preview_creating={"prod-wordpress-3"})
    assert preview.error is None, preview.error
    commands = preview.by_name(COMMAND)
    unknown = {host_of(n) for n, c in commands.items() if is_unknown(c.inputs["stdin"])}
    assert unknown == {"haproxy-www-1", "wordpress-1", "wordpress-2", "mysql-1", "mysql-2", "wordpress-3"}
    assert commands["prod-tunnel-1-apply"].inputs == applied["prod-tunnel-1-apply"].inputs  # shown unchanged


# ------------------------------------------------------------------------------------------ bad stacks


def _bad_stack(config: dict[str, Any]) -> None:
    config["enclave:regoin"] = config.pop("enclave:region")  # misspelt: unknown key, and region missing
    config["enclave:roles"]["mysql"]["count"] = -1
    config["enclave:roles"]["wordpress"]["ingress"][0]["from"] = "haproxy"


def test_a_bad_stack_fails_before_any_resource_naming_every_key() -> None:
    document = stack_document("prod")
    _bad_stack(document["config"])
    config = pulumi_config(document, private_key=None)
    with pytest.raises(StackError) as schema_error:  # what the CLI reports for the same stack
        enclave_config(config)
    expected = [issue.path for issue in schema_error.value.issues] + ["enclave:sshPrivateKey"]
    assert {"enclave:regoin", "enclave:region", "enclave:roles.mysql.count"} <= set(expected)

    run = run_program("prod", config)
    assert run.registrations == []
    assert run.error is not None and type(run.error).__name__ == "InvalidStack"
    message = str(run.error)
    for path in expected:
        assert path in message
    assert "nothing was created" in message


def _public_key_as_private(config: dict[str, Any]) -> None:
    config["enclave:sshPrivateKey"] = "ssh-ed25519 AAAA ops@example"


def _failing_test(config: dict[str, Any]) -> None:
    config["enclave:tests"].append({"from": "internet", "to": "mysql", "port": "tcp/3306", "expect": "allow"})


def _too_many_cloud_firewall_rules(config: dict[str, Any]) -> None:
    config["enclave:cloudFirewall"] = True
    config["enclave:roles"]["mysql"]["ingress"].append({"from": "wordpress", "ports": [f"tcp/{p}" for p in range(5000, 5060)]})


def _unchanged(config: dict[str, Any]) -> None:
    pass


@pytest.mark.parametrize(
    ("stack_name", "edit", "secret_keys", "expected"),
    [
        ("prod", _public_key_as_private, None, "enclave:sshPrivateKey: is not a private key"),
        ("prod", _unchanged, ["digitalocean:token"], "enclave:sshPrivateKey: is stored in plain text"),
        ("prod", _failing_test, None, "enclave:tests[10]: tests[10]: internet -> mysql tcp/3306 expect allow"),
        ("Prod_1", _unchanged, None, "(stack name): 'Prod_1'"),
        ("prod", _too_many_cloud_firewall_rules, None, "enclave:roles.mysql.ingress: with enclave:cloudFirewall"),
    ],
    ids=["public-key-as-private", "key-not-secret", "failing-stack-test", "stack-name", "cloud-firewall-limit"],
)
def test_the_program_refuses(stack_name: str, edit: Any, secret_keys: list[str] | None, expected: str) -> None:
    config = config_with("prod", edit)
    run = run_program(stack_name, config, secret_keys=secret_keys, addresses={})
    assert run.registrations == []
    assert run.error is not None and expected in str(run.error), run.error
    assert TEST_PRIVATE_KEY.strip() not in str(run.error) and "AAAA" not in str(run.error)


def test_rendering_depends_only_on_named_peers() -> None:
    """The push of a host that nobody names in its rules (the bastion) waits for no other droplet."""
    run = run_ok("prod", stack_config_map("prod"))
    tunnel = run.by_name(COMMAND)["prod-tunnel-1-apply"]
    droplets = {r.urn: r.name for r in run.of_type(DROPLET)}
    assert [droplets[d] for d in tunnel.dependencies if d in droplets] == ["prod-tunnel-1"]
