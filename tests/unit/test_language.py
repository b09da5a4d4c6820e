"""The policy language of issue 19: `from: all`, services, egress allowlists, descriptions and the messages, each
through schema, compiler, render, plan, diff, diagram, cloud firewall and the verifier (no root needed)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from config.schema import PortSpec, StackError, enclave_keys, load_config
from config.services import BUILTIN_SERVICES
from config.stackfile import Stack, load_stack
from enclave.cloudfirewall import OPEN_OUTBOUND, cloud_firewalls
from enclave.compiler import DO_RESOLVERS, METADATA_SERVICE, compile_policy
from enclave.diagram import network_picture, to_dot, to_mermaid
from enclave.diff import compare_stacks
from enclave.lab.probe import exhaustive_probe_count, plan_probes
from enclave.plan import Plan, build_plan, outsiders
from enclave.verify.prove import HostText, Prover

from ..conftest import ROOT, stack_document

Doc = dict[str, Any]


def shop() -> Doc:
    return stack_document("shop")


def roles(doc: Doc) -> dict[str, Any]:
    return doc["config"]["enclave:roles"]  # type: ignore[no-any-return]


def plan_of(doc: Doc, name: str = "shop") -> Plan:
    return build_plan(Stack(name, load_config(enclave_keys(doc["config"]))))


def problems(doc: Doc) -> list[str]:
    with pytest.raises(StackError) as caught:
        load_config(enclave_keys(doc["config"]))
    return [str(issue) for issue in caught.value.issues]


def rules(plan: Plan, host: str, family: int = 4) -> list[str]:
    files = plan.files[host]
    return (files.ipv4 if family == 4 else files.ipv6).splitlines()


def output_rules(plan: Plan, host: str, family: int = 4) -> list[str]:
    return [line for line in rules(plan, host, family) if line.startswith("-A ENCLAVE-OUTPUT")]


def proved(plan: Plan) -> list[str]:
    """The hosts the verifier could not prove equal to the policy ([] when all are)."""
    prover = Prover(plan.policy, plan.addresses)
    return [p.host for p in (prover.prove(HostText.of(f)) for f in plan.files.values()) if not p.proved]


# ------------------------------------------------------------------------------------------ from: all


def test_from_all_admits_every_role_including_its_own_and_a_role_added_later() -> None:
    doc = shop()
    roles(doc)["search"] = {"count": 1, "size": "s-1vcpu-1gb"}
    plan = plan_of(doc)
    statsd = PortSpec("udp", 8125, 8125)
    sources = {f.source.name for f in plan.policy.flows_to_role["metrics"] if statsd in f.ports}
    assert sources == set(roles(doc))  # metrics itself and the new `search` included, no edit to metrics
    search_set = next(line for line in rules(plan, "metrics-1") if "--dport 8125" in line and "enclave-search" in line)
    assert "-i eth1" in search_set and "every host sends its metrics" in search_set
    assert proved(plan) == []


def test_from_all_is_never_the_internet_or_the_operators() -> None:
    plan = plan_of(shop())
    others = outsiders(plan.policy.stack, plan.addresses)
    probes = plan_probes(plan.policy, plan.addresses, others)
    to_statsd = [p for p in probes.probes if p.target.host == "metrics-1" and p.port == PortSpec("udp", 8125, 8125)]
    by_source = {p.source.name: p.expected is not None for p in to_statsd if p.target.kind == "private" or
                 p.source.kind != "host"}
    assert by_source["internet"] is False and by_source["operator"] is False and by_source["neighbor"] is False
    assert by_source["worker-2"] is True and by_source["bastion-1"] is True


# ------------------------------------------------------------------------------------------- services


def test_service_names_expand_wherever_a_port_is() -> None:
    doc = shop()
    roles(doc)["api"]["ingress"].append({"from": "bastion", "ports": ["node-exporter", "dns", "udp/9999"]})
    doc["config"]["enclave:tests"].append({"from": "api", "to": "metrics", "port": "statsd", "expect": "allow"})
    stack = load_config(enclave_keys(doc["config"]))
    assert stack.roles["api"].ingress[0].ports == [PortSpec("tcp", 8000, 8000)]  # enclave:services app
    assert stack.roles["api"].ingress[-1].ports == [
        PortSpec("tcp", 9100, 9100), PortSpec("tcp", 53, 53), PortSpec("udp", 53, 53), PortSpec("udp", 9999, 9999)]
    assert stack.tests[-1].port == PortSpec("udp", 8125, 8125)


@pytest.mark.parametrize("edit,words", [
    (lambda d: roles(d)["api"]["ingress"].append({"from": "edge", "ports": ["stasd"]}),
     "roles.api.ingress[1].ports: 'stasd' is not a port or a service; did you mean 'statsd'?"),
    (lambda d: roles(d)["api"]["ingress"].append({"from": "edge", "ports": ["8125/udp"]}),
     "'8125/udp': enclave writes the protocol first; write udp/8125"),
    (lambda d: roles(d)["api"]["ingress"].append({"from": "edge", "ports": "tcp/80,443"}),
     "'tcp/80,443': several ports are a list; write ports: [tcp/80, tcp/443]"),
    (lambda d: d["config"].__setitem__("enclave:services", {"redis": ["tcp/6380"]}),
     "service 'redis' is built in (tcp/6379); give your service another name"),
    (lambda d: d["config"]["enclave:tests"].append({"from": "api", "to": "pg", "port": "dns", "expect": "deny"}),
     "'dns' is tcp/53 and udp/53; a test probes one port"),
])
def test_port_and_service_mistakes_say_what_to_write(edit: Any, words: str) -> None:
    doc = shop()
    edit(doc)
    found = problems(doc)
    assert any(words in p for p in found), found


def test_the_builtin_services_are_the_documented_table() -> None:
    text = (ROOT / "docs" / "stack-file.md").read_text()
    documented = dict(re.findall(r"^\| `([a-z-]+)` \| ([a-z0-9/, ]+) \|$", text, re.M))
    assert {name: tuple(ports.split(", ")) for name, ports in documented.items()} == BUILTIN_SERVICES


# ------------------------------------------------------------------------------------- egress allowlists


def test_allowlist_renders_peers_entries_essentials_then_drop() -> None:
    plan = plan_of(shop())
    out = output_rules(plan, "worker-1")
    assert out[0] == "-A ENCLAVE-OUTPUT -o lo -j ACCEPT"
    assert any("-o eth0 -p tcp -m tcp --dport 443" in r and "(payment provider and mail API)" in r for r in out)
    assert any("-o eth1 -p tcp -m tcp --dport 5432 -m set --match-set enclave-pg." in r for r in out)
    for resolver in DO_RESOLVERS:
        assert any(f"-d {resolver}/32 -p udp -m udp --dport 53" in r for r in out)
    assert any(f"-d {METADATA_SERVICE}/32 -p tcp -m tcp --dport 80" in r for r in out)
    assert any("-o eth0 -p udp -m udp --dport 123" in r and "egress essential: ntp" in r for r in out)
    assert out[-1].endswith('"egress allowlist: default drop" -j DROP')
    assert not any(r.startswith("-A ENCLAVE-OUTPUT -o eth0 -m comment") for r in out)  # nothing else out eth0
    assert ":OUTPUT DROP" in plan.files["worker-1"].ipv4


def test_an_empty_allowlist_leaves_only_peers_and_essentials_and_each_essential_switches_off() -> None:
    doc = shop()
    doc["config"]["enclave:egressEssentials"] = {"ntp": False, "metadata": False}
    plan = plan_of(doc)
    out = output_rules(plan, "redis-1")
    accepts = [r for r in out if r.endswith("-j ACCEPT")][2:]  # after loopback and replies
    peers = [r for r in accepts if "-d 67.207.67." not in r]
    assert len(peers) == 1 and "--dport 8125 -m set --match-set enclave-metrics." in peers[0]  # metrics admits all
    assert sum("--dport 53" in r and "-d 67.207.67." in r for r in accepts) == 4  # tcp+udp, 2 resolvers
    assert not any("--dport 123" in r or METADATA_SERVICE in r for r in out)
    assert proved(plan) == []


def test_a_listed_role_that_does_not_admit_the_sender_is_refused_with_the_fix() -> None:
    doc = shop()
    roles(doc)["edge"]["egress"].append({"to": "redis", "ports": ["redis"]})
    found = problems(doc)
    assert found == ["enclave:roles.edge.egress[1].to: 'redis': the ingress of redis on tcp/6379 does not admit role "
                     "edge, so the connection would be dropped there; add {from: edge, ports: [tcp/6379]} to "
                     "roles.redis.ingress, or remove this entry"]


@pytest.mark.parametrize("to,words", [
    ("operators", "'operators' is not a destination"),
    ("internt", "did you mean 'internet'?"),
    ("wrker", "did you mean 'worker'?"),
    ("0.0.0.0/0", "is every address; write `internet`"),
    ("10.130.0.0/16", "covers vpcIpRange 10.130.0.0/24 and beyond"),
    ("2001:db8::/32", "is an IPv6 range but role worker has no IPv6"),
])
def test_bad_egress_destinations_name_the_fix(to: str, words: str) -> None:
    doc = shop()
    roles(doc)["worker"]["egress"].append({"to": to, "ports": ["https"]})
    found = problems(doc)
    assert any(p.startswith("enclave:roles.worker.egress[3].to:") and words in p for p in found), found


def test_egress_to_cidrs_both_families_and_ipv6_control_prove_equal() -> None:
    doc = shop()
    worker = roles(doc)["worker"]
    worker["ipv6"] = True
    worker["egress"] += [{"to": ["203.0.113.0/24", "2001:db8:5::/48"], "ports": ["smtp", "icmp"]},
                         {"to": "10.130.0.200/32", "ports": ["tcp/9000"], "description": "a managed database"},
                         {"to": "pg-1", "ports": ["postgresql"]}, {"to": ["all"], "ports": ["ssh"]}]
    roles(doc)["pg"]["ingress"].append({"from": "all", "ports": ["ssh"]})
    for role in roles(doc).values():
        if role is not roles(doc)["pg"]:
            role.setdefault("ingress", []).append({"from": "worker", "ports": ["ssh"]})
    plan = plan_of(doc)
    v4, v6 = output_rules(plan, "worker-1", 4), output_rules(plan, "worker-1", 6)
    assert any("-o eth0 -d 203.0.113.0/24 -p tcp -m tcp --dport 25" in r for r in v4)
    assert any("-o eth1 -d 10.130.0.200/32 -p tcp -m tcp --dport 9000" in r for r in v4)
    assert any("-o eth0 -d 2001:db8:5::/48 -p ipv6-icmp" in r for r in v6)
    assert any("neighbour-solicitation" in r for r in v6)  # the host still resolves its IPv6 neighbours
    assert not any("203.0.113.0/24" in r for r in v6)
    assert proved(plan) == []


def test_a_rule_left_out_of_an_allowlist_is_found_by_the_verifier() -> None:
    plan = plan_of(shop())
    files = plan.files["worker-1"]
    without_https = "\n".join(line for line in files.ipv4.splitlines() if "--dport 443" not in line) + "\n"
    proof = Prover(plan.policy, plan.addresses).prove(dataclasses.replace(HostText.of(files), rules_v4=without_https))
    assert not proof.proved
    first = proof.differences[0]
    assert (first.hook, first.packet.dport, first.rules_accept, first.intent_accept) == ("OUTPUT", 443, False, True)
    assert first.reason == "roles.worker.egress[0]"


def test_egress_tests_to_internet_and_cidrs_are_checked_at_plan_time() -> None:
    doc = shop()
    doc["config"]["enclave:tests"] += [
        {"from": "worker", "to": "internet", "port": "smtp", "expect": "allow"},
        {"from": "edge", "to": "198.51.100.0/24", "port": "https", "expect": "allow"},
    ]
    plan = plan_of(doc)
    failed = {t.describe(): t.seen for t in plan.tests if not t.passed}
    assert failed == {
        f"tests[{len(plan.tests) - 2}]: worker -> internet tcp/25 expect allow": "deny",
        f"tests[{len(plan.tests) - 1}]: edge -> 198.51.100.0/24 tcp/443 expect allow": "deny",
    }
    assert all(t.passed for t in plan.tests[:-2])


def test_lab_probes_each_hosts_egress_and_the_source_egress_between_hosts() -> None:
    plan = plan_of(shop())
    others = outsiders(plan.policy.stack, plan.addresses)
    probes = plan_probes(plan.policy, plan.addresses, others)
    expect = {(p.source.name, p.target.host, p.target.kind, str(p.port)): p.expected is not None for p in probes.probes}
    assert expect[("worker-1", "internet", "public", "tcp/443")] is True
    assert expect[("worker-1", "internet", "public", "tcp/25")] is False
    assert expect[("worker-1", "203.0.113.0/24", "public", "tcp/443")] is True
    assert expect[("api-1", "internet", "public", "tcp/443")] is False
    assert expect[("metrics-1", "internet", "public", "tcp/25")] is True  # restricted: the public side is open
    assert expect[("internet", "edge-1", "public", "tcp/443")] is True
    assert expect[("worker-1", "edge-1", "public", "tcp/443")] is True  # the edge admits the internet; worker lists it
    assert expect[("api-1", "edge-1", "public", "tcp/443")] is False  # admitted there, but api's egress drops it
    assert exhaustive_probe_count(plan.policy, plan.addresses, others) == len(probes.probes)


# ---------------------------------------------------------------------------------------- descriptions


def test_descriptions_reach_comments_and_plan_json() -> None:
    plan = plan_of(shop())
    pg = plan.files["pg-1"].ipv4
    assert '"roles.pg.ingress[1]: pg-2 -> tcp/5432 (streaming replication from the primary)"' in pg
    data = plan.to_json()
    assert {"role": "bastion", "hosts": 1, "egress": "allowlist (empty: essentials only)",
            "description": "the only way in for operators"} in data["roles"]
    assert any(e["why"] == "roles.worker.egress[0] (payment provider and mail API)" for e in data["egress"])


@pytest.mark.parametrize("text,words", [
    ('say "hi"', "'\"' cannot be in a description"),
    ("back\\slash", "'\\\\' cannot be in a description"),
    ("ünïcode", "'ü' cannot be in a description"),
    ("x" * 201, "is 201 characters; a description is at most 200"),
])
def test_descriptions_iptables_cannot_carry_are_refused(text: str, words: str) -> None:
    doc = shop()
    roles(doc)["redis"]["ingress"][0]["description"] = text
    found = problems(doc)
    assert any(p.startswith("enclave:roles.redis.ingress[0].description:") and words in p for p in found), found


def test_a_long_description_is_cut_within_the_comment_limit() -> None:
    doc = shop()
    roles(doc)["redis"]["ingress"][0]["description"] = "y" * 200
    comments = re.findall(r'--comment "([^"]*)"', plan_of(doc).files["redis-1"].ipv4)
    assert max(len(c.encode()) for c in comments) <= 255


def test_a_description_change_shows_in_the_diff_as_the_comment_line() -> None:
    doc = shop()
    roles(doc)["redis"]["ingress"][0]["description"] = "sessions and jobs"
    _, diff = compare_stacks(Stack("shop", load_config(enclave_keys(doc["config"]))), load_stack("shop").config)
    changed = {h.host: h for h in diff.hosts if h.files}
    # redis's input rule, and its senders' egress rules that quote the entry they rely on
    assert set(changed) == {"redis-1", "api-1", "api-2", "worker-1", "worker-2"}
    for host in changed.values():
        lines = [(sign, line) for change in host.files for sign, line in change.lines]
        assert len(lines) == 2 * sum("(sessions and jobs)" in line for _, line in lines), lines


def test_a_role_description_change_is_a_diff_note_and_no_rule_change() -> None:
    doc = shop()
    roles(doc)["redis"]["description"] = "the job queue"
    _, diff = compare_stacks(Stack("shop", load_config(enclave_keys(doc["config"]))), load_stack("shop").config)
    assert [h.host for h in diff.hosts if h.action != "same"] == []
    assert diff.notes == ["roles.redis.description: 'sessions, carts and the job queue' -> 'the job queue' "
                          "(no rule changes)"]


def test_the_diagram_draws_egress_out_and_carries_descriptions() -> None:
    policy = compile_policy(load_stack("shop").config)
    picture = network_picture("shop", policy)
    mermaid = to_mermaid(picture)
    assert re.search(r'worker -\.->\|"tcp/443"\| internet', mermaid)
    assert "<i>background jobs (payments, mail)</i>" in mermaid
    dot = to_dot(picture).source
    assert 'tooltip="roles.worker.egress[0]: payment provider and mail API"' in dot
    assert 'tooltip="roles.metrics.ingress[0]: every host sends its metrics"' in dot


def test_cloud_firewall_outbound_rules_for_allowlists() -> None:
    policy = compile_policy(load_stack("shop").config)
    firewalls = {fw.role: fw for fw in cloud_firewalls("shop", policy)}
    worker = {(r.protocol, r.port_range): r for r in firewalls["worker"].outbound_rules}
    assert worker[("tcp", "443")].destination_addresses == ("0.0.0.0/0", "::/0")
    assert worker[("tcp", "5432")].destination_tags == ("enclave-shop-pg",)
    assert worker[("udp", "8125")].destination_tags == ("enclave-shop-metrics",)  # metrics admits `all`
    assert worker[("udp", "53")].destination_addresses == tuple(f"{r}/32" for r in DO_RESOLVERS)
    assert ("tcp", "1-65535") not in worker
    assert firewalls["metrics"].outbound_rules == OPEN_OUTBOUND  # restricted: the host firewall enforces it


# ------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("edit,words", [
    (lambda d: roles(d)["api"].__setitem__("ingres", []), "roles.api.ingres: unknown key 'ingres'; did you mean 'ingress'?"),
    (lambda d: roles(d)["api"]["egress"][0].__setitem__("too", "pg"), "unknown key 'too'; did you mean 'to'?"),
    (lambda d: d["config"].__setitem__("enclave:egressEssential", {}), "did you mean 'egressEssentials'?"),
    (lambda d: roles(d)["api"]["ingress"][0].__setitem__("from", "egde"), "did you mean 'edge'?"),
    (lambda d: d["config"]["enclave:tests"].append({"from": "api", "to": "pg-3", "port": 1, "expect": "deny"}),
     "role pg has only 2 host(s)"),
    (lambda d: roles(d)["api"].__setitem__("egress", "closed"), "'closed' is not one of open, restricted"),
])
def test_typos_get_a_suggestion(edit: Any, words: str) -> None:
    doc = shop()
    edit(doc)
    found = problems(doc)
    assert any(words in p for p in found), found


@pytest.mark.parametrize("key,value", [
    ("count", -1), ("count", "two"), ("count", 1.5), ("ipv6", "maybe"), ("size", ""), ("egress", 3),
    ("egress", [{"to": "internet"}]), ("egress", [{"to": "internet", "ports": [], "x": 1}]), ("description", 5),
])
def test_no_message_is_the_validation_librarys_own_words(key: str, value: Any) -> None:
    doc = shop()
    roles(doc)["api"][key] = value
    for problem in problems(doc):
        assert "Input should" not in problem and "input" not in problem.lower().split(":")[-1], problem
        assert problem.startswith("enclave:roles.api."), problem


def test_the_shop_stack_plans_and_proves(tmp_path: Path) -> None:
    plan = build_plan(load_stack("shop"))
    assert plan.ok and proved(plan) == []
    assert max(f.rule_count for f in plan.files.values()) < 60
