"""Private roles (`public: false`) through the pure layers: what the schema refuses, the rules a private droplet
gets (its one interface is eth0), the plan, its diff, the ssh config, the cloud firewalls, the verifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from config.schema import PortSpec, StackError, enclave_keys, load_config
from config.stackfile import Stack, load_stack
from enclave.cloudfirewall import cloud_firewalls
from enclave.compiler import Endpoint, compile_policy, decide
from enclave.diff import compare_stacks
from enclave.plan import build_plan, load_addresses
from enclave.private import install_warnings
from enclave.sshconfig import ssh_config
from enclave.verify.prove import HostText, Prover

from ..conftest import stack_document

Doc = dict[str, Any]


def private_doc() -> Doc:
    return stack_document("private")


def stack_of(doc: Doc) -> Stack:
    return Stack("private", load_config(enclave_keys(doc["config"])))


def issues_of(doc: Doc) -> list[str]:
    with pytest.raises(StackError) as refused:
        stack_of(doc)
    return [str(i) for i in refused.value.issues]


def db(doc: Doc) -> Doc:
    role: Doc = doc["config"]["enclave:roles"]["db"]
    return role


# --------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("source", ["internet", "operators", "203.0.113.0/24"])
def test_a_private_role_refuses_every_public_source_naming_the_key(source: str) -> None:
    doc = private_doc()
    db(doc)["ingress"].append({"from": ["web", source], "ports": ["tcp/5432"]})
    (issue,) = issues_of(doc)
    assert issue.startswith("enclave:roles.db.ingress[2].from:") and repr(source) in issue
    assert "nothing public can reach it" in issue


def test_a_private_role_is_no_bastion_has_no_ipv6_and_needs_a_bastion() -> None:
    doc = private_doc()
    db(doc).update(bastion=True, ipv6=True)
    issues = issues_of(doc)
    assert any(i.startswith("enclave:roles.db.public:") and "a bastion" in i for i in issues)
    assert any(i.startswith("enclave:roles.db.ipv6:") and "no IPv6 address" in i for i in issues)

    doc = private_doc()
    del doc["config"]["enclave:roles"]["tunnel"]
    doc["config"]["enclave:tests"] = [t for t in doc["config"]["enclave:tests"] if "tunnel" not in t.values()]
    (issue,) = issues_of(doc)
    assert issue.startswith("enclave:roles.db.public:") and "only through a bastion, and the stack has none" in issue


def test_nat_gateway_settings() -> None:
    assert stack_of(private_doc()).config.nat_gateway is not None  # on by default when there are private roles
    doc = private_doc()
    doc["config"]["enclave:natGateway"] = False
    assert stack_of(doc).config.nat_gateway is None and not stack_of(doc).config.uses_nat_gateway()
    doc["config"]["enclave:natGateway"] = {"size": 0}
    (issue,) = issues_of(doc)
    assert issue.startswith("enclave:natGateway.size:")
    doc["config"]["enclave:natGateway"] = {"sise": 2}
    (issue,) = issues_of(doc)
    assert issue.startswith("enclave:natGateway.sise:") and "unknown key" in issue
    doc = private_doc()
    db(doc)["count"] = 0
    doc["config"]["enclave:tests"] = [t for t in doc["config"]["enclave:tests"] if "db" not in str(t)]
    assert not stack_of(doc).config.uses_nat_gateway()  # no private droplet: no gateway to pay for
    prod = load_stack("prod").config
    assert prod.nat_gateway is not None and not prod.uses_nat_gateway()  # no private role: no gateway


# --------------------------------------------------------------------------------------------- rules


def test_a_private_droplets_rules_name_only_its_one_interface_eth0() -> None:
    plan = build_plan(stack_of(private_doc()))
    v4 = plan.files["db-1"].ipv4
    assert "-i eth1" not in v4 and "-o eth1" not in v4  # eth1 does not exist on a private droplet
    accepts = [line for line in v4.splitlines() if line.startswith("-A ENCLAVE-INPUT -i ") and "-i lo " not in line]
    assert accepts and all(line.startswith("-A ENCLAVE-INPUT -i eth0 ") for line in accepts)
    # restricted egress: the Internet is what is not the VPC, on eth0, through the NAT gateway
    assert "-A ENCLAVE-OUTPUT -o eth0 ! -d 10.130.0.0/24 " in v4
    # the web tier keeps eth0 public, eth1 private
    assert "-A ENCLAVE-INPUT -i eth0 -p tcp -m tcp --dport 443 " in plan.files["web-1"].ipv4
    doc = private_doc()
    doc["config"]["enclave:interfaces"] = {"privateOnly": "ens3"}
    assert "-i ens3 " in build_plan(stack_of(doc)).files["db-1"].ipv4


def test_the_policy_admits_nothing_public_to_a_private_host_and_prove_agrees() -> None:
    plan = build_plan(stack_of(private_doc()))
    db1 = plan.policy.host_by_name["db-1"]
    internet = Endpoint("internet", "internet", "192.0.2.10")
    assert decide(plan.policy, internet, db1, PortSpec("tcp", 22, 22), "public") is None
    web = Endpoint("host", "web-1")
    assert decide(plan.policy, web, db1, PortSpec("tcp", 5432, 5432), "private") is not None
    prover = Prover(plan.policy, plan.addresses)
    assert all(prover.prove(HostText.of(files)).proved for files in plan.files.values())
    # the intent knows a private host's Internet is outside the VPC: letting all of eth0 out is caught
    files = plan.files["db-1"]
    loose = files.ipv4.replace("-o eth0 ! -d 10.130.0.0/24 ", "-o eth0 ")
    proof = Prover(plan.policy, plan.addresses).prove(HostText("db-1", loose, files.ipv6, files.ipsets, "mutated"))
    assert not proof.proved and all(d.hook == "OUTPUT" for d in proof.differences)


def test_no_public_cloud_firewall_rules_for_a_private_role() -> None:
    policy = compile_policy(stack_of(private_doc()).config)
    (db_firewall,) = [f for f in cloud_firewalls("private", policy) if f.role == "db"]
    assert all(not rule.source_addresses for rule in db_firewall.inbound_rules)


def test_ssh_config_and_addresses_of_private_hosts() -> None:
    plan = build_plan(stack_of(private_doc()))
    assert plan.addresses["db-1"].public is None
    text = ssh_config("private", plan.policy, plan.addresses, "root")
    block = text.split("Host private-db-1\n")[1].split("\n\n")[0]
    assert f"HostName {plan.addresses['db-1'].private}" in block and "ProxyJump private-tunnel-1" in block
    assert next(h for h in plan.to_json()["hosts"] if h["name"] == "db-1")["public"] is None


def test_addresses_file_takes_null_for_private_hosts_and_refuses_a_public_one(tmp_path: Path) -> None:
    plan = build_plan(stack_of(private_doc()))
    hosts = {n: {"public": a.public, "private": a.private} for n, a in plan.addresses.items()}
    path = tmp_path / "addrs.json"
    path.write_text(json.dumps(hosts))
    assert load_addresses(path, plan.policy) == plan.addresses
    hosts["db-1"]["public"] = "203.0.113.9"
    path.write_text(json.dumps(hosts))
    with pytest.raises(StackError, match="db-1: public '203.0.113.9' given, but role db has `public: false`"):
        load_addresses(path, plan.policy)


# --------------------------------------------------------------------------------------- plan, diff


def test_changing_public_says_the_droplets_are_replaced() -> None:
    before = stack_of(private_doc()).config
    doc = private_doc()
    db(doc)["public"] = True
    _, diff = compare_stacks(stack_of(doc), before)
    (note,) = diff.notes
    assert note.startswith("roles.db.public changed (false -> true): droplets db-1, db-2 are replaced")
    _, same = compare_stacks(stack_of(private_doc()), before)
    assert same.notes == []


def test_plan_warns_when_private_droplets_cannot_install_packages() -> None:
    doc = private_doc()
    doc["config"]["enclave:natGateway"] = False
    (warning,) = install_warnings(stack_of(doc).config)
    assert warning.startswith("roles.db: public: false with natGateway: false and no aptProxy")
    doc["config"]["enclave:aptProxy"] = "http://10.130.0.2:3142"
    assert install_warnings(stack_of(doc).config) == []
    del doc["config"]["enclave:aptProxy"]
    db(doc)["image"] = "171234567"  # a snapshot that has the tools
    assert install_warnings(stack_of(doc).config) == []
    assert install_warnings(stack_of(private_doc()).config) == []  # the NAT gateway reaches the mirrors


def test_a_private_roles_egress_allowlist_reaches_the_internet_only_through_the_nat_gateway() -> None:
    """An allowlist on a role without public networking: `internet` and a CIDR outside the VPC leave its one
    interface for addresses outside the VPC range (the NAT gateway's side), and the verifier proves it so."""
    doc = private_doc()
    db(doc)["egress"] = [{"to": "internet", "ports": ["tcp/443"]}, {"to": "203.0.113.0/24", "ports": ["tcp/5432"]}]
    plan = build_plan(stack_of(doc))
    v4 = plan.files["db-1"].ipv4
    vpc = doc["config"]["enclave:vpcIpRange"]
    assert f"-A ENCLAVE-OUTPUT -o eth0 ! -d {vpc} -p tcp -m tcp --dport 443 " in v4
    assert "-A ENCLAVE-OUTPUT -o eth0 -d 203.0.113.0/24 -p tcp -m tcp --dport 5432 " in v4
    assert "eth1" not in v4 and "-o eth0 -p tcp -m tcp --dport 443" not in v4  # never the VPC itself on 443
    prover = Prover(plan.policy, plan.addresses)
    assert [h for h, f in plan.files.items() if not prover.prove(HostText.of(f)).proved] == []
