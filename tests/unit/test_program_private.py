"""Private roles (`public: false`), the VPC NAT gateway and the bastions' reserved IPs, as the program registers them.

Runs the real `__main__.py` under the SDK's mocks (tests/pulumi_harness.py) for stacks/Pulumi.private.yaml: a
bastion, a public web tier and a private database tier.
"""

from __future__ import annotations

from typing import Any

from enclave.compiler import compile_policy
from enclave.plan import droplet_name
from enclave.sshconfig import ssh_config

from ..pulumi_harness import ProgramRun, droplet_public, enclave_config, mocked_addresses, run_program, stack_config_map
from .test_program import DROPLET, PUSH, RESERVED_IP, VPC, config_with, request

NAT_GATEWAY = "digitalocean:index/vpcNatGateway:VpcNatGateway"
IGNORED = {"userData", "sshKeys"}  # the droplets' ignore_changes (components/network.py)


def run_ok(config: dict[str, str]) -> ProgramRun:
    run = run_program("private", config)
    assert run.error is None, run.error
    return run


def test_private_droplets_have_no_public_networking_and_public_ones_keep_the_default() -> None:
    run = run_ok(stack_config_map("private"))
    droplets = run.by_name(DROPLET)
    assert {n: d.inputs.get("publicNetworking") for n, d in droplets.items()} == {
        "private-tunnel-1": None, "private-web-1": None, "private-web-2": None,
        "private-db-1": False, "private-db-2": False,
    }


def test_one_nat_gateway_the_vpcs_default_route_created_before_the_private_droplets() -> None:
    run = run_ok(config_with("private", lambda c: c.update({"enclave:natGateway": {"size": 2, "udpTimeoutSeconds": 30}})))
    (gateway,) = run.of_type(NAT_GATEWAY)
    (vpc,) = run.of_type(VPC)
    assert gateway.inputs["type"] == "PUBLIC" and gateway.inputs["region"] == "ams3"
    assert gateway.inputs["size"] == 2 and gateway.inputs["udpTimeoutSeconds"] == 30
    assert "tcpTimeoutSeconds" not in gateway.inputs  # left to DigitalOcean's default
    assert gateway.inputs["vpcs"] == [{"vpcUuid": vpc.id, "defaultGateway": True}]
    for name, droplet in run.by_name(DROPLET).items():
        # the private droplets' first boot installs packages through it: they wait for it
        assert (gateway.urn in droplet.dependencies) == name.startswith("private-db-"), name


def test_no_nat_gateway_without_private_roles_or_when_opted_out() -> None:
    opted_out = run_ok(config_with("private", lambda c: c.update({"enclave:natGateway": False})))
    assert opted_out.of_type(NAT_GATEWAY) == []
    assert [d.inputs.get("publicNetworking") for d in opted_out.by_name(DROPLET).values()].count(False) == 2
    assert run_program("prod", stack_config_map("prod")).of_type(NAT_GATEWAY) == []


def test_each_bastion_keeps_a_reserved_ip_which_ssh_config_and_outputs_use_and_pushes_do_not() -> None:
    config = stack_config_map("private")
    stack = enclave_config(config)
    policy = compile_policy(stack)
    run = run_ok(config)
    (reserved,) = run.of_type(RESERVED_IP)
    droplets = run.by_name(DROPLET)
    assert reserved.name == "private-tunnel-1-ip"
    assert reserved.inputs == {"region": "ams3", "dropletId": int(droplets["private-tunnel-1"].id)}

    mocked = mocked_addresses("private", stack)
    known = {h.name: mocked[droplet_name("private", h)] for h in policy.hosts}
    bastion = known["tunnel-1"].public  # the reserved IP (the mocks give the droplet itself another address)
    # the pushes dial the droplet's own address: after a replacement, the previous run's "via" still reaches
    # the old bastion, and the new one is a new known_hosts entry (components/network.py)
    own = droplet_public(known["tunnel-1"])
    assert own != bastion
    pushes = run.by_name(PUSH)
    assert request(pushes["private-tunnel-1-push"]).address == own
    for host in ("web-1", "db-1", "db-2"):
        got = request(pushes[f"private-{host}-push"])
        assert (got.address, got.bastions) == (known[host].private, (own,))
    assert run.outputs["bastion"] == bastion
    assert run.outputs["sshConfig"] == ssh_config("private", policy, known, "root", identity_file="~/.ssh/enclave-private")
    assert f"HostName {bastion}" in run.outputs["sshConfig"]
    assert run.outputs["hosts"]["db-1"]["public"] is None and run.outputs["hosts"]["tunnel-1"]["public"] == bastion


def _droplet_inputs(run: ProgramRun) -> dict[str, dict[str, Any]]:
    return {name: d.inputs for name, d in run.by_name(DROPLET).items()}


def test_no_droplet_changes_when_an_unrelated_key_does() -> None:
    """The droplets' inputs (what DigitalOcean would update or replace them for) stay the same when the NAT
    gateway, an egress setting, an ingress rule, a test or another role's size changes."""
    before = run_ok(stack_config_map("private"))

    def edit(c: dict[str, Any]) -> None:
        c["enclave:natGateway"] = {"size": 3, "tcpTimeoutSeconds": 600}
        c["enclave:roles"]["db"]["egress"] = "open"
        c["enclave:roles"]["db"]["ingress"].append({"from": "tunnel", "ports": ["tcp/9187"]})
        c["enclave:roles"]["web"]["size"] = "s-2vcpu-2gb"
        c["enclave:tests"] = c["enclave:tests"][:2]

    after = run_ok(config_with("private", edit))
    old, new = _droplet_inputs(before), _droplet_inputs(after)
    changed = {name for name in old if old[name] != new[name]}
    for name in old:
        assert set(before.by_name(DROPLET)[name].ignore_changes) == IGNORED
    assert changed == {"private-web-1", "private-web-2"}  # their size only (a resize, not a replacement)
    for name in changed:
        assert {k for k in old[name] if old[name][k] != new[name][k]} == {"size"}
    assert after.by_name(RESERVED_IP)["private-tunnel-1-ip"].inputs == before.by_name(RESERVED_IP)["private-tunnel-1-ip"].inputs


def test_changing_public_changes_public_networking_which_replaces_the_droplets() -> None:
    """`public_networking` forces new droplets in the provider: the one input that differs is that one (and the
    first-boot user data, which names the new interface, and which the program ignores on existing droplets:
    the replacement boots with it)."""
    before = run_ok(stack_config_map("private"))
    after = run_ok(config_with("private", lambda c: c["enclave:roles"]["db"].update(public=True)))
    old, new = _droplet_inputs(before), _droplet_inputs(after)
    for name in old:
        differs = {k for k in {*old[name], *new[name]} if old[name].get(k) != new[name].get(k)} - IGNORED
        assert differs == ({"publicNetworking"} if name.startswith("private-db-") else set()), name
    assert after.of_type(NAT_GATEWAY) == []  # no private role left: no gateway
