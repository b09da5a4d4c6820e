"""What the lab probes and how it judges the answers: pure logic, no namespaces (runs without root)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config.schema import PortSpec
from config.stackfile import load_stack, load_stack_file
from enclave.cli import main
from enclave.lab import probe
from enclave.lab.probe import Outcome, ProbeSet, plan_probes, probe_numbers
from enclave.lab.report import port_summary
from enclave.plan import Plan, build_plan, outsiders

from .conftest import stack_document


def prod_probes() -> tuple[ProbeSet, Plan]:
    plan = build_plan(load_stack("prod"))
    others = outsiders(plan.policy.stack, plan.addresses)
    return plan_probes(plan.policy, plan.addresses, others), plan


def perfect_netfilter(probes: ProbeSet) -> list[Outcome]:
    """What a lab whose rules mean exactly the compiled policy would see."""
    return [Outcome(p, p.expected is not None, "connected" if p.expected else "timeout") for p in probes.probes]


def test_every_source_probes_every_other_host_on_each_address_it_can_reach() -> None:
    probes, _ = prod_probes()
    seen = {(p.source.name, p.target.host, p.target.kind) for p in probes.probes}
    hosts = [h.name for h in probes.hosts]
    for src in hosts:
        for dst in hosts:
            kinds = {kind for (s, d, kind) in seen if s == src and d == dst}
            if src == dst:
                assert kinds == set()  # itself: loopback, always open
            elif src.startswith("mysql") and dst.startswith("mysql"):
                assert kinds == {"private", "public", "public6"}  # both have IPv6 (roles.mysql.ipv6)
            else:
                assert kinds == {"private", "public"}
    for dst in hosts:
        assert {k for (s, d, k) in seen if s == "neighbor" and d == dst} == {"private"}
        assert {k for (s, d, k) in seen if s == "operator" and d == dst} == {"public"}  # operators are IPv4 only
        ipv6 = {"public6"} if dst.startswith("mysql") else set()
        assert {k for (s, d, k) in seen if s == "internet" and d == dst} == {"public"} | ipv6


def test_ports_cover_declared_ranges_both_protocols_ssh_a_never_declared_port_and_icmp() -> None:
    probes, _ = prod_probes()
    ports = set(probes.ports)
    for number in (22, 80, 3306, 24007, 24008, 49152, 49201, 49251):  # 49152-49251: ends and middle
        assert {PortSpec("tcp", number, number), PortSpec("udp", number, number)} <= ports
    never = probes.never_declared
    assert not any(spec.low <= never <= spec.high for spec in probes.declared if spec.proto != "icmp")
    assert PortSpec("tcp", never, never) in ports and PortSpec("udp", never, never) in ports
    assert PortSpec("icmp") in ports
    assert probe_numbers(PortSpec("tcp", 8000, 8001)) == [8000, 8001]


def test_never_declared_port_avoids_a_declared_range(tmp_path: Path) -> None:
    doc = stack_document("dev")
    doc["config"]["enclave:roles"]["mysql"]["ingress"].append({"from": "wordpress", "ports": ["tcp/7000-10000"]})
    path = tmp_path / "Pulumi.wide.yaml"
    path.write_text(yaml.safe_dump(doc))
    plan = build_plan(load_stack_file(path))
    probes = plan_probes(plan.policy, plan.addresses, outsiders(plan.policy.stack, plan.addresses))
    assert not 7000 <= probes.never_declared <= 10000


def expectation(probes: ProbeSet, src: str, dst: str, kind: str, port: str) -> str | None:
    (match,) = [
        p for p in probes.probes if (p.source.name, p.target.host, p.target.kind, str(p.port)) == (src, dst, kind, port)
    ]
    return match.expected.why if match.expected else None


def test_expected_verdicts_follow_the_address_a_probe_arrives_on() -> None:
    probes, _ = prod_probes()
    assert expectation(probes, "tunnel-1", "mysql-1", "private", "tcp/22") == "ssh through bastion tunnel"
    assert expectation(probes, "operator", "tunnel-1", "public", "tcp/22") == "bastion: ssh from operators"
    assert expectation(probes, "internet", "haproxy-www-1", "public", "tcp/80") == "roles.haproxy-www.ingress[0]"
    assert expectation(probes, "wordpress-1", "mysql-1", "private", "tcp/3306") == "roles.mysql.ingress[0]"
    # a role is its private addresses: the same host over the public network is a stranger
    assert expectation(probes, "wordpress-1", "mysql-1", "public", "tcp/3306") is None
    assert expectation(probes, "mysql-2", "mysql-1", "public6", "tcp/3306") is None
    assert expectation(probes, "wordpress-1", "mysql-1", "private", "udp/3306") is None  # tcp was declared
    assert all(p.expected is None for p in probes.probes if p.source.name == "neighbor")
    assert all(p.expected is None for p in probes.probes if p.port.low == probes.never_declared)


def test_perfect_netfilter_passes_every_stack_test_like_the_plan() -> None:
    probes, plan = prod_probes()
    others = outsiders(plan.policy.stack, plan.addresses)
    results = probe.tests_with_packets(plan.policy, plan.addresses, others, perfect_netfilter(probes))
    assert [r.seen for r in results] == [t.seen for t in plan.tests]
    assert all(r.passed for r in results)


def test_one_dropped_pair_fails_the_test_that_names_it() -> None:
    probes, plan = prod_probes()
    outcomes = perfect_netfilter(probes)
    dropped = next(
        i for i, o in enumerate(outcomes)
        if (o.probe.source.name, o.probe.target.host, o.probe.target.kind, str(o.probe.port))
        == ("wordpress-2", "mysql-1", "private", "tcp/3306")
    )
    outcomes[dropped] = Outcome(outcomes[dropped].probe, False, "timeout")
    others = outsiders(plan.policy.stack, plan.addresses)
    results = probe.tests_with_packets(plan.policy, plan.addresses, others, outcomes)
    failed = [r for r in results if not r.passed]
    assert [r.describe() for r in failed] == ["tests[3]: wordpress -> mysql tcp/3306 expect allow"]
    assert failed[0].seen == "mixed"
    mysql_1 = plan.addresses["mysql-1"].private
    assert f"wordpress-2->mysql-1 {mysql_1} (timeout)" in failed[0].detail
    assert not outcomes[dropped].matches
    described = outcomes[dropped].describe()
    assert described.startswith(f"wordpress-2 -> mysql-1 {mysql_1} (private) tcp/3306: expected allow, seen deny")
    assert "roles.mysql.ingress[0]" in described  # the declaration that should have admitted it


def test_port_summary_shows_a_range_only_when_all_its_probes_passed() -> None:
    declared = [PortSpec("tcp", 22, 22), PortSpec("tcp", 49152, 49251)]
    whole = [PortSpec("tcp", n, n) for n in (22, 49152, 49201, 49251)] + [PortSpec("icmp")]
    assert port_summary(whole, declared) == "tcp 22,49152-49251 icmp"
    part = [PortSpec("tcp", n, n) for n in (49152, 49251)] + [PortSpec("udp", 53, 53)]
    assert port_summary(part, declared) == "tcp 49152,49251 udp 53"


def test_lab_without_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["lab", "check", "--stack", "dev"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_lab_with_an_unknown_stack_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "check", "--stack", "nope"]) == 2
    assert "--stack" in capsys.readouterr().err
