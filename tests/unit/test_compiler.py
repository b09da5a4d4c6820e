"""The compiler and renderer: what lands on each prod host, and how it behaves as the fleet grows."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.schema import PortSpec, enclave_keys, load_config
from config.stackfile import Stack, load_stack
from enclave.cli import main
from enclave.compiler import Endpoint, compile_policy, decide
from enclave.ipsets import base_name, parse_ipsets, without_generations
from enclave.plan import build_plan, example_addresses
from enclave.push import host_files
from enclave.render import baseline_files, set_name

from ..conftest import stack_document

GOLDEN = Path(__file__).parent.parent / "golden" / "prod"
UPDATE = os.environ.get("ENCLAVE_UPDATE_GOLDEN") == "1"


def stack_from(doc: dict[str, Any], name: str = "prod") -> Stack:
    return Stack(name, load_config(enclave_keys(doc["config"])))


@pytest.mark.parametrize("host", ["tunnel-1", "haproxy-www-1", "wordpress-1", "wordpress-2", "mysql-1", "mysql-2"])
@pytest.mark.parametrize("part", ["rules.v4", "rules.v6", "ipsets"])
def test_prod_rule_files_match_golden(host: str, part: str) -> None:
    """The exact files each prod host receives (regenerate with ENCLAVE_UPDATE_GOLDEN=1 and review the diff)."""
    files = build_plan(load_stack("prod")).files[host]
    text = {"rules.v4": files.ipv4, "rules.v6": files.ipv6, "ipsets": files.ipsets}[part]
    path = GOLDEN / f"{host}.{part}"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


def test_golden_files_say_what_the_seed_tutorial_wants() -> None:
    """Read the goldens as a reviewer would: default drop, ssh only via the bastion, http only on the LB."""
    v4 = {p.name.split(".")[0]: p.read_text() for p in GOLDEN.glob("*.rules.v4")}
    for host, text in v4.items():
        assert ":INPUT DROP" in text and "-A ENCLAVE-INPUT -m comment --comment \"default drop\" -j DROP" in text
        ssh = [line for line in text.splitlines() if "--dport 22 " in line]
        if host.startswith("tunnel"):
            assert any("-i eth0" in line and "--match-set enclave-operators src" in without_generations(line) for line in ssh)
        assert any("-i eth1" in line and "--match-set enclave-tunnel src" in without_generations(line) for line in ssh), host
        assert not any("-i eth0" in line for line in ssh if not host.startswith("tunnel")), host
        public = [line for line in text.splitlines() if "-i eth0" in line and line.startswith("-A ENCLAVE-INPUT")]
        if host.startswith("haproxy"):
            assert len(public) == 1 and "--dport 80" in public[0]
        elif not host.startswith("tunnel"):
            assert public == [], host
    assert ":OUTPUT DROP" in v4["haproxy-www-1"] and ":OUTPUT ACCEPT" in v4["wordpress-1"]


def scaled(count: int) -> dict[str, int]:
    doc = stack_document("prod")
    doc["config"]["enclave:vpcIpRange"] = "10.110.0.0/16"
    doc["config"]["enclave:roles"]["wordpress"]["count"] = count
    plan = build_plan(stack_from(doc))
    return {h: files.rule_count for h, files in plan.files.items()}


def test_rule_count_per_host_does_not_grow_with_the_fleet() -> None:
    small, large = scaled(2), scaled(200)
    for host in ("tunnel-1", "haproxy-www-1", "wordpress-1", "mysql-1", "mysql-2"):
        assert small[host] == large[host], host
    assert large["wordpress-200"] == small["wordpress-1"]


def test_scaling_changes_set_members_not_rules() -> None:
    doc = stack_document("prod")
    before = build_plan(stack_from(doc)).files
    doc["config"]["enclave:roles"]["wordpress"]["count"] = 3
    after_plan = build_plan(stack_from(doc))
    after, after_addresses = after_plan.files, after_plan.addresses
    # the rules only follow the wordpress set to its new generation (a hash of its members)
    assert after["mysql-1"].ipv4 != before["mysql-1"].ipv4
    assert without_generations(after["mysql-1"].ipv4) == without_generations(before["mysql-1"].ipv4)
    old_sets, new_sets = (
        {base_name(name): members for name, (_, members) in parse_ipsets(files["mysql-1"].ipsets).items()}
        for files in (before, after)
    )
    assert new_sets == {**old_sets, "enclave-wordpress": (*old_sets["enclave-wordpress"], after_addresses["wordpress-3"].private)}
    # a host that accepts nothing from wordpress does not change at all
    assert after["tunnel-1"] == before["tunnel-1"]
    # and no existing host's example address moved (they do not on DigitalOcean either)
    assert all(after_addresses[h] == a for h, a in build_plan(stack_from(stack_document("prod"))).addresses.items())


def test_decide_is_the_reference_semantics() -> None:
    stack = load_stack("prod").config
    policy = compile_policy(stack)
    host = {h.name: h for h in policy.hosts}
    wordpress = Endpoint("host", "wordpress-1")
    haproxy = Endpoint("host", "haproxy-www-1")
    outsider = Endpoint("internet", "internet", "192.0.2.10", "2001:db8:ff::10")
    operator = Endpoint("operators", "operator", "198.51.100.7")
    mysql_port = PortSpec("tcp", 3306, 3306)
    assert decide(policy, wordpress, host["mysql-1"], mysql_port, "private") is not None
    assert decide(policy, haproxy, host["mysql-1"], mysql_port, "private") is None
    assert decide(policy, wordpress, host["mysql-1"], mysql_port, "public") is None
    glusterfs = decide(policy, wordpress, host["wordpress-2"], PortSpec("tcp", 49200, 49200), "private")
    assert glusterfs is not None and glusterfs.why == "roles.wordpress.ingress[1]"
    assert decide(policy, outsider, host["haproxy-www-1"], PortSpec("tcp", 80, 80), "public") is not None
    assert decide(policy, outsider, host["haproxy-www-1"], PortSpec("tcp", 80, 80), "public", family=6) is None
    assert decide(policy, outsider, host["tunnel-1"], PortSpec("tcp", 22, 22), "public") is None
    assert decide(policy, operator, host["tunnel-1"], PortSpec("tcp", 22, 22), "public") is not None
    assert decide(policy, operator, host["mysql-1"], PortSpec("tcp", 22, 22), "public") is None


def test_bastionless_stack_opens_ssh_to_operators_on_every_host() -> None:
    doc = stack_document("prod")
    doc["config"]["enclave:roles"]["tunnel"]["bastion"] = False
    doc["config"]["enclave:tests"] = []
    plan = build_plan(stack_from(doc))
    for host, files in plan.files.items():
        ssh = [line for line in files.ipv4.splitlines() if "--dport 22 " in line]
        assert ssh and all("-i eth0" in line and "--match-set enclave-operators src" in without_generations(line)
                           for line in ssh), host
    mysql_v6 = plan.files["mysql-1"].ipv6
    assert "enclave-operators_v6" not in mysql_v6  # no IPv6 operator ranges: no IPv6 ssh rule at all


def test_ipv6_public_services_and_cidrs_render_in_the_right_family() -> None:
    doc = stack_document("prod")
    roles = doc["config"]["enclave:roles"]
    roles["mysql"]["ingress"].append({"from": ["2001:db8:1::/48", "203.0.113.0/24"], "ports": ["tcp/9104", "icmp"]})
    doc["config"]["enclave:operators"].append("2001:db8:2::/64")
    plan = build_plan(stack_from(doc))
    v4, v6 = plan.files["mysql-1"].ipv4, plan.files["mysql-1"].ipv6
    assert "-s 203.0.113.0/24" in v4 and "2001:db8:1::/48" not in v4
    assert "-s 2001:db8:1::/48" in v6 and "203.0.113.0/24" not in v6
    assert "--icmpv6-type 128" in v6 and "--icmp-type 8" in v4
    # haproxy-www has no ipv6: its IPv6 table admits nothing public at all
    assert "-i eth0" not in plan.files["haproxy-www-1"].ipv6.split("default drop")[0]


def _icmpv6_accepts(v6: str) -> list[str]:
    """The ICMPv6 control accepts of a table: every ICMPv6 accept except the ping a flow declares."""
    return [line for line in v6.splitlines()
            if "ipv6-icmp" in line and "--icmpv6-type 128" not in line and line.endswith("-j ACCEPT")]


def test_an_ipv6_role_accepts_icmpv6_control_only_on_its_public_interface_from_on_link_senders() -> None:
    plan = build_plan(load_stack("prod"))  # mysql has ipv6, on eth0; eth1 is the VPC
    v6 = plan.files["mysql-1"].ipv6
    accepts = _icmpv6_accepts(v6)
    by_type = {line.split("--icmpv6-type ")[1].split()[0]: line for line in accepts}
    assert set(by_type) == {"neighbour-solicitation", "neighbour-advertisement", "router-advertisement", "130"}
    for kind, line in by_type.items():
        assert line.startswith("-A ENCLAVE-INPUT") and " -i eth0 " in line and line.endswith("-j ACCEPT"), line
        assert v6.index(line) < v6.index("--ctstate INVALID -j DROP")  # conntrack calls ND and MLD invalid
    for kind in ("neighbour-solicitation", "neighbour-advertisement", "router-advertisement"):
        assert "-m hl --hl-eq 255" in by_type[kind]  # RFC 4861: not forwarded, so from the link itself
    assert "-m hl --hl-eq 1" in by_type["130"]
    # a router advertisement or an MLD query comes from the gateway's link-local address, never from afar
    assert "-s fe80::/10 " in by_type["router-advertisement"] and "-s fe80::/10 " in by_type["130"]
    # no router solicitation (the host is no router), no redirect, no error accepted outside conntrack's RELATED
    for kind in ("router-solicitation", "redirect", "packet-too-big", "destination-unreachable", "time-exceeded",
                 "parameter-problem"):
        assert kind not in "\n".join(line for line in v6.splitlines() if not line.endswith("-j DROP")), kind
    assert "-A ENCLAVE-INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in v6


@pytest.mark.parametrize("host", ["tunnel-1", "haproxy-www-1", "wordpress-1"])
def test_a_role_without_ipv6_accepts_no_icmpv6_control_at_all(host: str) -> None:
    """The rogue-RA finding: without ipv6, not even a router advertisement on the public interface is accepted."""
    files = build_plan(load_stack("prod")).files[host]
    assert _icmpv6_accepts(files.ipv6) == []


def test_the_baseline_accepts_icmpv6_control_exactly_as_the_pushed_rules_do() -> None:
    stack = load_stack("prod")
    plan = build_plan(stack)
    for host, role in (("mysql-1", "mysql"), ("haproxy-www-1", "haproxy-www")):
        assert _icmpv6_accepts(baseline_files(stack.config, role).ipv6) == _icmpv6_accepts(plan.files[host].ipv6)


def test_restricted_egress_sends_icmpv6_only_out_of_the_public_interface() -> None:
    doc = stack_document("prod")
    doc["config"]["enclave:roles"]["haproxy-www"]["ipv6"] = True  # restricted egress and IPv6
    v6 = build_plan(stack_from(doc)).files["haproxy-www-1"].ipv6
    output = [line for line in v6.splitlines() if line.startswith("-A ENCLAVE-OUTPUT")]
    assert not any("ipv6-icmp" in line for line in output)  # no ND out of the private interface (no IPv6 there)
    assert any(line.startswith("-A ENCLAVE-OUTPUT -o eth0 ") and line.endswith("-j ACCEPT") for line in output)
    assert output[-1].endswith("-j DROP")


def test_long_role_names_get_short_unique_set_names() -> None:
    a, b = set_name("a-very-long-role-name-for-the-api-1x"), set_name("a-very-long-role-name-for-the-api-2x")
    assert a != b and len(a) <= 27 and len(b) <= 27 and a.startswith("enclave-")


def test_log_drops_adds_a_rate_limited_log_before_the_drop() -> None:
    doc = stack_document("prod")
    doc["config"]["enclave:logDrops"] = True
    v4 = build_plan(stack_from(doc)).files["mysql-1"].ipv4.splitlines()
    log = next(i for i, line in enumerate(v4) if "-j LOG" in line)
    assert "-m limit" in v4[log] and "default drop" in v4[log + 1]


def test_example_addresses_are_inside_the_vpc_and_distinct() -> None:
    stack = load_stack("prod").config
    addresses = example_addresses(compile_policy(stack))
    private = [a.private for a in addresses.values()]
    assert len(set(private)) == len(private)
    assert all(a.endswith(tuple(".%d" % n for n in range(2, 255))) for a in private)


# ------------------------------------------------------------------------------------------------ CLI


def test_plan_prints_hosts_flows_and_tests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "prod"]) == 0
    out = capsys.readouterr().out
    assert "prod-mysql-2" in out and "roles.mysql.ingress[0]" in out and "FAIL" not in out


def test_plan_host_prints_exact_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "prod", "--host", "mysql-1"]) == 0
    out = capsys.readouterr().out
    assert (GOLDEN / "mysql-1.rules.v4").read_text() in out
    assert (GOLDEN / "mysql-1.rules.v6").read_text() in out


def plan_host_sections(out: str) -> dict[str, str]:
    """`plan --host H` output -> {file name: its text} (sections start with `### H: name`)."""
    sections = re.split(r"^### [^:\n]+: (\S+)\n", out, flags=re.M)
    return dict(zip(sections[1::2], sections[2::2]))


def test_plan_host_prints_what_lands_and_its_rules_name_exactly_its_sets(capsys: pytest.CaptureFixture[str]) -> None:
    """What `ipset list -n` shows on mysql-1 after a push: the sets the ipsets file creates, each referenced by a
    rule (enclave sweeps the unreferenced), under their generation names."""
    assert main(["plan", "--stack", "prod", "--host", "mysql-1"]) == 0
    printed = plan_host_sections(capsys.readouterr().out)
    landed = host_files(build_plan(load_stack("prod")).files["mysql-1"])
    assert printed == {name: landed[name] for name in ("ipsets", "rules.v4", "rules.v6")}
    created = {line.split()[1] for line in printed["ipsets"].splitlines() if line.startswith("create ")}
    referenced = set(re.findall(r"--match-set (\S+) ", printed["rules.v4"] + printed["rules.v6"]))
    assert created == referenced == set(landed["sets"].split())
    assert all(re.fullmatch(r"enclave-[a-z0-9_-]+\.[0-9a-z]{3}", name) for name in created), created
    assert {base_name(name) for name in created} == {"enclave-mysql", "enclave-tunnel", "enclave-wordpress"}


def test_plan_output_writes_every_hosts_files_byte_for_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan" / "prod"  # created, parents too
    assert main(["plan", "--stack", "prod", "--output", str(out)]) == 0
    plan = build_plan(load_stack("prod"))
    assert sorted(p.name for p in out.iterdir()) == sorted(plan.files)
    for host, files in plan.files.items():
        landed = host_files(files)
        assert sorted(p.name for p in (out / host).iterdir()) == ["ipsets", "rules.v4", "rules.v6"]
        for name in ("ipsets", "rules.v4", "rules.v6"):
            assert (out / host / name).read_bytes() == landed[name].encode(), (host, name)
    assert f"under {out}/<host>/" in capsys.readouterr().out
    # --host: that host only
    one = tmp_path / "one"
    assert main(["plan", "--stack", "prod", "--host", "mysql-1", "--output", str(one)]) == 0
    assert [p.name for p in one.iterdir()] == ["mysql-1"]


def test_plan_output_refuses_a_file_or_an_unwritable_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "plan.txt"
    a_file.write_text("mine\n")
    assert main(["plan", "--stack", "prod", "--output", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "exists and is not a directory" in err and "give a directory" in err
    assert a_file.read_text() == "mine\n"
    assert main(["plan", "--stack", "prod", "--output", str(a_file / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "cannot be written" in err


def test_plan_json_and_addresses_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = compile_policy(load_stack("prod").config)
    real = {
        h.name: {"public": f"203.0.113.{i + 10}", "private": f"10.110.16.{i + 100}", "public6": None}
        for i, h in enumerate(policy.hosts)
    }
    path = tmp_path / "addresses.json"
    path.write_text(json.dumps(real))
    assert main(["plan", "--stack", "prod", "--addresses", str(path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True
    assert {h["name"]: h["private"] for h in data["hosts"]}["mysql-1"] == real["mysql-1"]["private"]
    assert main(["plan", "--stack", "prod", "--addresses", str(path), "--host", "mysql-1"]) == 0
    assert re.search(rf"^add enclave-wordpress\.[0-9a-z]{{3}} {re.escape(str(real['wordpress-2']['private']))}$",
                     capsys.readouterr().out, re.M)


def test_addresses_file_missing_a_host_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "addresses.json"
    path.write_text(json.dumps({"tunnel-1": {"public": "203.0.113.1", "private": "10.110.16.9"}}))
    assert main(["plan", "--stack", "prod", "--addresses", str(path)]) == 2
    assert "--addresses mysql-1" in capsys.readouterr().err


def test_addresses_file_entry_without_public_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = {h: dict(vars(a)) for h, a in example_addresses(compile_policy(load_stack("prod").config)).items()}
    del real["mysql-1"]["public"]
    path = tmp_path / "addresses.json"
    path.write_text(json.dumps(real))
    assert main(["plan", "--stack", "prod", "--addresses", str(path)]) == 2
    assert "--addresses mysql-1: public missing; give both" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda a: a["mysql-1"].update(public=5), "--addresses mysql-1: public must be an address as text"),
        (lambda a: a["mysql-1"].update(private=a["mysql-2"]["private"]), "private 10.110.16.9 is mysql-1's too"),
    ],
    ids=["number", "shared-private"],
)
def test_addresses_file_bad_values_are_named(
    change: Any, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = {h: dict(vars(a)) for h, a in example_addresses(compile_policy(load_stack("prod").config)).items()}
    change(real)
    path = tmp_path / "addresses.json"
    path.write_text(json.dumps(real))
    assert main(["plan", "--stack", "prod", "--addresses", str(path)]) == 2
    assert words in capsys.readouterr().err


def test_operators_wider_than_every_internet_stand_in_still_plan() -> None:
    """With operators that cover every example Internet address, the Internet is operators: it may SSH to the
    bastion, as the lab's packets then show (and the plan does not fail looking for an address outside)."""
    doc = stack_document("prod")
    doc["config"]["enclave:operators"] = ["192.0.0.0/2"]
    doc["config"]["enclave:tests"].append({"from": "internet", "to": "tunnel", "port": 22, "expect": "allow"})
    plan = build_plan(stack_from(doc))
    assert plan.ok, [t.detail for t in plan.tests if not t.passed]


def test_a_failing_stack_test_fails_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = stack_document("prod")
    doc["config"]["enclave:tests"].append({"from": "haproxy-www", "to": "mysql-1", "port": 3306, "expect": "allow"})
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", "--stack-file", str(path)]) == 1
    out = capsys.readouterr().out
    assert "haproxy-www -> mysql-1 tcp/3306 expect allow" in out and "deny" in out


def test_unknown_host_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "prod", "--host", "mysql-9"]) == 2
    err = capsys.readouterr().err
    assert "--host: 'mysql-9': no such host" in err and "mysql-2" in err


def test_rule_files_name_the_hosts_whose_addresses_they_contain() -> None:
    """The Pulumi program re-pushes a host exactly when one of these hosts' addresses changes."""
    doc = stack_document("prod")
    doc["config"]["enclave:roles"]["wordpress"]["ingress"].append({"from": "mysql-2", "ports": ["tcp/8080"]})
    plan = build_plan(stack_from(doc))
    peers = {host: files.peers for host, files in plan.files.items()}
    assert peers["tunnel-1"] == ("tunnel-1",)  # ssh from the bastion role, itself included
    assert peers["mysql-1"] == ("mysql-1", "mysql-2", "tunnel-1", "wordpress-1", "wordpress-2")
    assert peers["wordpress-1"] == ("haproxy-www-1", "mysql-2", "tunnel-1", "wordpress-1", "wordpress-2")
    # restricted egress: haproxy-www names the wordpress hosts it may send to
    assert peers["haproxy-www-1"] == ("tunnel-1", "wordpress-1", "wordpress-2")
    for host, files in plan.files.items():
        text = files.ipv4 + files.ipsets
        used = {h for h, a in plan.addresses.items() if a.private in text.split() or f"{a.private}/32" in text}
        assert used == set(files.peers), host


def test_unknown_host_flag_is_quoted_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    """A --host with brackets is a bad host name, not a rich markup error with a traceback."""
    assert main(["plan", "--stack", "prod", "--host", "mysql-[/1]"]) == 2
    assert "'mysql-[/1]': no such host" in capsys.readouterr().err
