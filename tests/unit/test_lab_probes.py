"""What the lab probes and how it judges the answers: pure logic, no namespaces (runs without root)."""

from __future__ import annotations

import io
import json
import time
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

from ..conftest import stack_document


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


def test_a_fleet_invariant_is_probed_at_the_ends_and_middle_of_every_port(tmp_path: Path) -> None:
    doc = stack_document("dev")
    doc["config"]["enclave:tests"] = [{"from": "outside", "to": "mysql", "port": "any", "expect": "deny"}]
    path = tmp_path / "Pulumi.invariant.yaml"
    path.write_text(yaml.safe_dump(doc))
    plan = build_plan(load_stack_file(path))
    others = outsiders(plan.policy.stack, plan.addresses)
    probes = plan_probes(plan.policy, plan.addresses, others)
    assert {PortSpec(proto, n, n) for proto in ("tcp", "udp") for n in (1, 32768, 65535)} <= set(probes.ports)
    assert not any(f.ports and any(p.low <= probes.never_declared <= p.high for p in f.ports) for f in plan.policy.flows)
    (result,) = probe.tests_with_packets(plan.policy, plan.addresses, others, perfect_netfilter(probes))
    assert result.seen == "deny" and result.passed


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
    # between hosts; to the Internet every port a host's open egress lets out is expected through
    assert all(p.expected is None for p in probes.probes if p.port.low == probes.never_declared
               and p.target.host != "internet")
    assert expectation(probes, "mysql-1", "internet", "public", f"tcp/{probes.never_declared}") == "egress open"


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


# ------------------------------------------------------------------------------------------ at fleet scale


def scaled_stack(tmp_path: Path, wordpress: int, mysql: int) -> Path:
    doc = stack_document("prod")
    doc["config"]["enclave:roles"]["wordpress"]["count"] = wordpress
    doc["config"]["enclave:roles"]["mysql"]["count"] = mysql
    path = tmp_path / f"Pulumi.scaled{wordpress}x{mysql}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def role_level(probes: ProbeSet) -> set[tuple[str, str, str, str, str | None]]:
    """What a probe proves about the rule text: source role (or outsider), destination role, address, port,
    and the declaration that admits it."""
    roles = {h.name: h.role for h in probes.hosts}
    return {(roles.get(p.source.name, p.source.name), roles.get(p.target.host, p.target.host), p.target.kind, str(p.port),
             p.expected.why if p.expected else None) for p in probes.probes}


def test_a_sample_probes_every_role_pair_address_and_port_that_every_pair_does(tmp_path: Path) -> None:
    plan = build_plan(load_stack_file(scaled_stack(tmp_path, wordpress=7, mysql=5)))
    others = outsiders(plan.policy.stack, plan.addresses)
    sample = probe.sample_hosts(plan.policy)
    # first and last of each role, and the hosts the stack's tests name on their own (mysql-1, mysql-2)
    assert set(sample) == {"tunnel-1", "haproxy-www-1", "wordpress-1", "wordpress-7", "mysql-1", "mysql-2", "mysql-5"}
    every = plan_probes(plan.policy, plan.addresses, others)
    sampled = plan_probes(plan.policy, plan.addresses, others, sample)
    assert role_level(sampled) == role_level(every)
    assert len(sampled.probes) < len(every.probes) / 2
    assert probe.exhaustive_probe_count(plan.policy, plan.addresses, others) == len(every.probes)
    assert not sampled.exhaustive and every.exhaustive


def test_the_lab_samples_only_past_20_000_probes_and_its_cost_grows_linearly(tmp_path: Path) -> None:
    from enclave.lab.lab import EXHAUSTIVE_MAX_PROBES, Lab  # builds nothing until `with`

    prod = Lab(load_stack("prod"))
    assert prod.sample is None and len(prod.probe_set.probes) <= EXHAUSTIVE_MAX_PROBES
    sizes = {}
    for wordpress, mysql in ((30, 20), (60, 40)):
        lab = Lab(load_stack_file(scaled_stack(tmp_path, wordpress, mysql)))
        assert lab.sample is not None  # exhaustive would be ~120 000 and ~450 000 probes
        entries = lab.neighbour_entries()
        sizes[wordpress + mysql] = (len(lab.probe_set.probes), sum(map(len, entries.values())))
        # every IPv4 probe has its static neighbour entries, both ways
        for p in lab.probe_set.probes:
            if p.target.kind != "public6":
                src, dst = lab.link(p.source.name, p.target.kind), lab.link(p.target.host, p.target.kind)
                assert src and dst and (src[0], dst[1], dst[2]) in entries[p.source.name]
                assert (dst[0], src[1], src[2]) in entries[p.target.host]
    assert sizes[50][0] == sizes[100][0]  # the probes depend on roles, not hosts
    assert sizes[100][1] < 2.2 * sizes[50][1]  # neighbour entries: linear (exhaustive would quadruple)


def test_a_probe_the_sending_kernel_refused_is_the_harness_not_the_firewall() -> None:
    probes, _ = prod_probes()
    p = probes.probes[0]
    assert Outcome(p, False, "enobufs").kernel_error
    assert Outcome(p, False, "ehostunreach").kernel_error
    for detail in ("timeout", "timeout (twice, 2 s)", "connected", "reply", "refused (REJECT or no listener)",
                   "blocked by the source's own OUTPUT rules"):
        assert not Outcome(p, False, detail).kernel_error


def big_report(tmp_path: Path) -> probe.LabReport:
    plan = build_plan(load_stack_file(scaled_stack(tmp_path, wordpress=30, mysql=20)))
    others = outsiders(plan.policy.stack, plan.addresses)
    sample = probe.sample_hosts(plan.policy)
    probes = plan_probes(plan.policy, plan.addresses, others, sample)
    outcomes = perfect_netfilter(probes)
    wrong = next(i for i, o in enumerate(outcomes) if o.probe.source.name == "neighbor" and not o.passed)
    outcomes[wrong] = Outcome(outcomes[wrong].probe, True, "connected")  # one host admits the neighbour
    tests = probe.tests_with_packets(plan.policy, plan.addresses, others, outcomes, sample)
    proofs = [probe.HostProof(h.name, True, "as compiled") for h in plan.policy.hosts]
    return probe.LabReport("scaled", "abc123", probes, outcomes, tests, plan.tests, host_proofs=proofs)


def test_at_size_the_matrix_collapses_to_roles_and_names_the_host_that_differs(tmp_path: Path) -> None:
    from rich.console import Console
    from enclave.lab.report import print_report

    report = big_report(tmp_path)
    (mismatch,) = report.mismatches
    console = Console(record=True, width=160, file=io.StringIO())
    print_report(report, console)
    text = console.export_text()
    assert "per source role (rows) and destination role" in text
    matrix = text.split("cells:")[0]
    assert "wordpress (wordpress-1, wordpress-30)" in matrix and "wordpress-7" not in matrix
    assert f"✗ neighbor->{mismatch.probe.target.host} {mismatch.probe.port}: expected" in matrix
    assert f"{mismatch.describe()}" in text.replace("\n", "")  # and in full under the matrix
    assert "52 of 52 hosts: live rules, sets and digest" in text
    assert all(t.passed for t in report.tests)  # the stack's tests are judged on the sampled pairs


def test_json_at_size_summarises_per_role_instead_of_listing_every_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = big_report(tmp_path)
    monkeypatch.setattr(probe, "MAX_LISTED_PROBES", 100)
    document = report.to_json()
    assert "probes" not in document and len(json.dumps(document)) < 200_000
    assert document["summary"]["mode"] == "sampled" and document["summary"]["hostsProven"] == 52
    (mismatch,) = document["mismatches"]
    assert mismatch["src"] == "neighbor" and mismatch["seen"] == "allow"
    groups = {(g["src"], g["dst"], g["kind"]): g for g in document["probesByRole"]}
    assert groups[("internet", "haproxy-www", "public")]["allowed"] == ["tcp/80"]
    assert sum(g["probes"] for g in groups.values()) == len(report.outcomes)


def test_an_agent_that_stops_answering_is_a_harness_error_not_a_drop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller waits as long as results keep coming; a silent agent is named, never read as drops."""
    import socket
    import threading

    probes, _ = prod_probes()
    path = str(tmp_path / "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    sent_one = threading.Event()

    def half_an_agent() -> None:  # answers the first probe, then goes silent
        conn, _ = server.accept()
        request = json.loads(conn.makefile().readline())
        first = request["probes"][0]
        conn.sendall(json.dumps({"results": [[first[0], False, "timeout"]]}).encode() + b"\n")
        sent_one.set()
        time.sleep(3)
        conn.close()

    threading.Thread(target=half_an_agent, daemon=True).start()
    monkeypatch.setattr(probe, "AGENT_SILENCE_S", 0.5)
    batch = probes.probes[:10]
    with pytest.raises(probe.HarnessError, match=r"sent no result for .* with 9 of 10 probes outstanding"):
        probe.send_probes({p.source.name: path for p in batch}, batch)
    assert sent_one.is_set()
    server.close()
