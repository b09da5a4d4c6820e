"""Cloud firewalls: one per role, derived from the same flows as the host rules, within DigitalOcean's limits."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.schema import StackError, enclave_keys, load_config
from enclave.cli import main
from enclave.cloudfirewall import (
    MAX_RULES,
    CloudFirewall,
    InboundRule,
    check_cloud_firewalls,
    cloud_firewalls,
    limit_issues,
    role_tag,
)
from enclave.compiler import Policy, compile_policy

from ..conftest import stack_document

ANYWHERE = ("0.0.0.0/0", "::/0")


def policy_of(doc: dict[str, Any]) -> Policy:
    return compile_policy(load_config(enclave_keys(doc["config"])))


def with_cloud_firewall(doc: dict[str, Any]) -> dict[str, Any]:
    doc["config"]["enclave:cloudFirewall"] = True
    return doc


def inbound(firewall: CloudFirewall) -> set[tuple[str, str | None, tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    return {(r.protocol, r.port_range, r.source_addresses, r.source_tags, r.source_hosts) for r in firewall.inbound_rules}


def test_prod_rules_per_role() -> None:
    """The seed's goal at the edge too: 80 open to the world on haproxy-www only, ssh from operators on the bastion."""
    firewalls = {fw.role: fw for fw in check_cloud_firewalls("prod", policy_of(with_cloud_firewall(stack_document("prod"))))}
    tag = {role: f"enclave-prod-{role}" for role in ("tunnel", "haproxy-www", "wordpress", "mysql")}
    assert inbound(firewalls["tunnel"]) == {("tcp", "22", ("198.51.100.7/32",), (tag["tunnel"],), ())}
    assert inbound(firewalls["haproxy-www"]) == {
        ("tcp", "22", (), (tag["tunnel"],), ()),
        ("tcp", "80", ANYWHERE, (), ()),
    }
    assert inbound(firewalls["wordpress"]) == {
        ("tcp", "22", (), (tag["tunnel"],), ()),
        ("tcp", "80", (), (tag["haproxy-www"],), ()),
        ("tcp", "24007-24008", (), (tag["wordpress"],), ()),
        ("tcp", "49152-49251", (), (tag["wordpress"],), ()),
    }
    # two sources declared for the same port become one rule: DigitalOcean counts rules, not sources
    assert inbound(firewalls["mysql"]) == {
        ("tcp", "22", (), (tag["tunnel"],), ()),
        ("tcp", "3306", (), (tag["wordpress"], tag["mysql"]), ()),
    }
    for role, fw in firewalls.items():
        assert fw.tags == (tag[role],) and fw.name == tag[role]
        assert {(r.protocol, r.port_range, r.destination_addresses) for r in fw.outbound_rules} == {
            ("tcp", "1-65535", ANYWHERE),
            ("udp", "1-65535", ANYWHERE),
            ("icmp", None, ANYWHERE),
        }
    world_open = {role for role, fw in firewalls.items() for r in fw.inbound_rules if "0.0.0.0/0" in r.source_addresses}
    assert world_open == {"haproxy-www"}


def test_host_cidr_icmp_and_ipv6_operator_sources() -> None:
    doc = with_cloud_firewall(stack_document("prod"))
    cfg = doc["config"]
    cfg["enclave:operators"] = ["198.51.100.7/32", "2001:db8:1::/48"]
    cfg["enclave:roles"]["mysql"]["ingress"] = [
        {"from": "mysql-2", "ports": ["tcp/3306"]},
        {"from": ["203.0.113.0/24", "internet"], "ports": ["icmp", "udp/161"]},
    ]
    firewalls = {fw.role: fw for fw in check_cloud_firewalls("prod", policy_of(doc))}
    assert inbound(firewalls["mysql"]) == {
        ("tcp", "22", (), ("enclave-prod-tunnel",), ()),
        # a single host is admitted by its droplet id, not widened to its role's tag
        ("tcp", "3306", (), (), ("mysql-2",)),
        ("icmp", None, ("203.0.113.0/24", *ANYWHERE), (), ()),
        ("udp", "161", ("203.0.113.0/24", *ANYWHERE), (), ()),
    }
    assert inbound(firewalls["tunnel"]) == {
        ("tcp", "22", ("198.51.100.7/32", "2001:db8:1::/48"), ("enclave-prod-tunnel",), ()),
    }


def test_a_role_without_hosts_gets_no_firewall_and_admits_nothing() -> None:
    doc = with_cloud_firewall(stack_document("prod"))
    doc["config"]["enclave:roles"]["wordpress"]["count"] = 0
    doc["config"]["enclave:tests"] = []
    firewalls = {fw.role: fw for fw in check_cloud_firewalls("prod", policy_of(doc))}
    assert "wordpress" not in firewalls
    mysql = {r.port_range: r for r in firewalls["mysql"].inbound_rules}
    assert mysql["3306"].source_tags == ("enclave-prod-mysql",)  # not the tag no droplet carries


def test_off_by_default() -> None:
    policy = policy_of(stack_document("prod"))
    assert check_cloud_firewalls("prod", policy) == []
    assert len(cloud_firewalls("prod", policy)) == 4  # derivable all the same (the diagram, the tests)


def test_tags_are_valid_digitalocean_names() -> None:
    assert role_tag("prod.eu", "mysql") == "enclave-prod-eu-mysql"
    assert role_tag("staging_2", "web") == "enclave-staging_2-web"
    assert cloud_firewalls("prod.eu_2", policy_of(stack_document("prod")))[0].name == "enclave-prod.eu-2-tunnel"


def test_specs_map_one_to_one_onto_the_pulumi_args() -> None:
    """Every field lands in the provider's own argument class (the program builds them the same way)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK warns about unrelated products on import
        import pulumi_digitalocean as digitalocean

    doc = with_cloud_firewall(stack_document("prod"))
    doc["config"]["enclave:roles"]["mysql"]["ingress"].append({"from": "mysql-2", "ports": "icmp"})
    droplet_ids = {"mysql-2": 4242}
    for fw in check_cloud_firewalls("prod", policy_of(doc)):
        for r in fw.inbound_rules:
            args = digitalocean.FirewallInboundRuleArgs(
                protocol=r.protocol,
                port_range=r.port_range,
                source_addresses=list(r.source_addresses),
                source_tags=list(r.source_tags),
                source_droplet_ids=[droplet_ids[h] for h in r.source_hosts],
            )
            assert args.protocol == r.protocol and args.port_range == r.port_range
        for o in fw.outbound_rules:
            out = digitalocean.FirewallOutboundRuleArgs(
                protocol=o.protocol, port_range=o.port_range, destination_addresses=list(o.destination_addresses)
            )
            assert out.destination_addresses == list(ANYWHERE)
        firewall_args = digitalocean.FirewallArgs(name=fw.name, tags=list(fw.tags))
        assert firewall_args.tags == list(fw.tags)
    field_names = {f.name for f in dataclasses.fields(InboundRule)} - {"source_hosts", "keys"}
    init = digitalocean.FirewallInboundRuleArgs.__init__.__code__.co_varnames
    assert field_names <= set(init)


# ------------------------------------------------------------------------------------------- limits


def many_ports_doc(ports: int) -> dict[str, Any]:
    doc = with_cloud_firewall(stack_document("prod"))
    doc["config"]["enclave:roles"]["wordpress"]["ingress"] = [
        {"from": "haproxy-www", "ports": [f"tcp/{8000 + 2 * i}" for i in range(ports)]}
    ]
    doc["config"]["enclave:tests"] = []
    return doc


def test_fifty_rules_is_the_most_a_firewall_takes() -> None:
    # tcp/22 from the bastion + N ports + 3 outbound rules
    ok = check_cloud_firewalls("prod", policy_of(many_ports_doc(MAX_RULES - 4)))
    assert max(fw.rule_count for fw in ok) == MAX_RULES
    with pytest.raises(StackError) as exc:
        check_cloud_firewalls("prod", policy_of(many_ports_doc(MAX_RULES - 3)))
    (issue,) = exc.value.issues
    assert issue.path == "enclave:roles.wordpress.ingress"
    assert "51 rules" in issue.message and "enclave:cloudFirewall" in issue.message and "tcp/8000-8100" in issue.message


def test_more_operators_than_the_user_data_can_carry_are_refused_before_any_firewall() -> None:
    from config.schema import MAX_OPERATORS

    """1 000 operator addresses would exceed a Cloud Firewall rule's 1 000 sources, but the stack refuses them
    first: bastions boot with one baseline rule per operator, in user data DigitalOcean caps at 64 KiB."""
    doc = with_cloud_firewall(stack_document("prod"))
    doc["config"]["enclave:operators"] = [f"198.51.{100 + i // 250}.{i % 250 + 1}/32" for i in range(1000)]
    with pytest.raises(StackError) as exc:
        policy_of(doc)
    (issue,) = exc.value.issues
    assert issue.path == "enclave:operators" and str(MAX_OPERATORS) in issue.message


def test_too_many_cidr_sources_in_one_ingress() -> None:
    doc = with_cloud_firewall(stack_document("prod"))
    cidrs = [f"203.{i // 256}.{i % 256}.0/24" for i in range(1001)]
    doc["config"]["enclave:roles"]["haproxy-www"]["ingress"] = [{"from": cidrs, "ports": ["tcp/443"]}]
    with pytest.raises(StackError) as exc:
        check_cloud_firewalls("prod", policy_of(doc))
    (issue,) = exc.value.issues
    assert issue.path == "enclave:roles.haproxy-www.ingress[0].from"
    assert "tcp/443" in issue.message and "1001 sources" in issue.message


def test_more_than_five_tags_is_refused() -> None:
    fw = CloudFirewall("web", "enclave-prod-web", tuple(f"t{i}" for i in range(6)), (), ())
    (issue,) = limit_issues(fw)
    assert issue.path == "enclave:roles.web" and "5 per firewall" in issue.message


def write_stack(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_refuses_an_over_limit_stack_only_when_cloud_firewalls_are_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = many_ports_doc(60)
    assert main(["plan", "--stack-file", str(write_stack(tmp_path, doc))]) == 2
    err = capsys.readouterr().err
    assert "enclave:roles.wordpress.ingress" in err and "enclave:cloudFirewall" in err
    doc["config"]["enclave:cloudFirewall"] = False
    assert main(["plan", "--stack-file", str(write_stack(tmp_path, doc))]) == 0


def test_cli_plan_lists_the_firewalls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_stack(tmp_path, with_cloud_firewall(stack_document("prod")))
    assert main(["plan", "--stack-file", str(path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_role = {fw["role"]: fw for fw in data["cloudFirewalls"]}
    assert [r["port_range"] for r in by_role["haproxy-www"]["inbound_rules"]] == ["22", "80"]
