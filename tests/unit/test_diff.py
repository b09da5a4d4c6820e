"""`enclave plan --diff-from OLD.yaml`: what a stack change does to each host, line by line and set by set."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.schema import enclave_keys, load_config
from config.stackfile import Stack, load_stack
from enclave.cli import main
from enclave.diff import HostChange, PlanDiff, SetChange, compare_stacks
from enclave.ipsets import base_name, parse_ipsets
from enclave.plan import Plan, build_plan
from enclave.render import set_name

from ..conftest import STACKS, stack_document

PROD = STACKS / "Pulumi.prod.yaml"


def config_of(doc: dict[str, Any]) -> Any:
    return load_config(enclave_keys(doc["config"]))


def change_prod(edit: Any) -> tuple[Plan, PlanDiff]:
    """The prod stack edited by `edit(config)`, compared with prod as committed."""
    doc = stack_document("prod")
    edit(doc["config"])
    new = Stack("prod", config_of(doc))
    return compare_stacks(new, load_stack("prod").config)


def by_host(diff: PlanDiff) -> dict[str, HostChange]:
    return {h.host: h for h in diff.hosts}


def scale_wordpress(cfg: dict[str, Any]) -> None:
    cfg["enclave:roles"]["wordpress"]["count"] = 3


def test_scaling_adds_a_host_and_only_set_members_elsewhere() -> None:
    new, diff = change_prod(scale_wordpress)
    hosts = by_host(diff)
    assert hosts["wordpress-3"].action == "create" and hosts["wordpress-3"].rules == new.files["wordpress-3"].rule_count
    added = new.addresses["wordpress-3"].private
    wordpress_set = set_name("wordpress")
    for host in ("mysql-1", "mysql-2"):
        assert hosts[host].action == "update"
        assert hosts[host].files == ()  # not one rule line changes: peers are matched through the set
        assert hosts[host].sets == (SetChange(wordpress_set, "changed", (added,), ()),)
    # every other host that matches wordpress through its set sees the same member join, and nothing else
    users = {h for h, files in new.files.items() if wordpress_set in map(base_name, files.set_names) and h != "wordpress-3"}
    assert {h.host for h in diff.hosts if h.action == "update"} == users
    assert hosts["tunnel-1"].action == "same"
    # existing hosts keep their addresses, as droplets do; the new one does not take any of theirs
    old = build_plan(load_stack("prod"))
    assert all(new.addresses[h] == old.addresses[h] for h in old.addresses)
    assert added not in {a.private for a in old.addresses.values()}
    assert (diff.lines_added, diff.lines_removed, diff.members_joined, diff.members_left) == (0, 0, len(users), 0)


def test_changing_a_port_shows_exactly_that_rule_removed_and_added() -> None:
    def move_http(cfg: dict[str, Any]) -> None:
        cfg["enclave:roles"]["wordpress"]["ingress"][0]["ports"] = ["tcp/8080"]

    new, diff = change_prod(move_http)
    hosts = by_host(diff)
    for host in ("wordpress-1", "wordpress-2"):
        (change,) = hosts[host].files
        assert change.file == "rules.v4"
        # the rule in INPUT, and its copy for published container ports in FORWARD
        ((minus, old_line), (plus, new_line)) = [(sign, line) for sign, line in change.lines if "ENCLAVE-INPUT" in line]
        assert [line.replace("ENCLAVE-FORWARD", "") for _, line in change.lines if "ENCLAVE-FORWARD" in line] == [
            line.replace("ENCLAVE-INPUT", "").replace("-m tcp --dport", "-m conntrack --ctstate DNAT --ctorigdstport")
            .replace("-j ACCEPT", "-j RETURN") for line in (old_line, new_line)]
        assert (minus, plus) == ("-", "+")
        assert "--dport 80 " in old_line and "--dport 8080 " in new_line
        assert old_line.replace("80", "8080") == new_line  # the same rule (and comment), only the port moved
        assert new_line in new.files[host].ipv4.splitlines()
        assert hosts[host].sets == ()
    # haproxy-www's restricted egress follows: its OUTPUT rule to wordpress moves too
    (egress,) = hosts["haproxy-www-1"].files
    assert [sign for sign, _ in egress.lines] == ["-", "+"]
    assert all("ENCLAVE-OUTPUT" in line for _, line in egress.lines)
    assert {h for h, c in hosts.items() if c.action == "same"} == {"tunnel-1", "mysql-1", "mysql-2"}


def test_scaling_down_deletes_the_host_and_its_address_leaves_the_sets() -> None:
    def shrink(cfg: dict[str, Any]) -> None:
        cfg["enclave:roles"]["mysql"]["count"] = 1
        cfg["enclave:tests"] = [t for t in cfg["enclave:tests"] if "mysql-2" not in t.values()]

    _, diff = change_prod(shrink)
    hosts = by_host(diff)
    gone = build_plan(load_stack("prod")).addresses["mysql-2"].private
    assert hosts["mysql-2"].action == "delete"
    assert hosts["mysql-1"].sets == (SetChange(set_name("mysql"), "changed", (), (gone,)),)


def test_a_new_source_role_brings_a_new_set_and_a_new_rule() -> None:
    def monitoring(cfg: dict[str, Any]) -> None:
        cfg["enclave:roles"]["monitor"] = {"count": 1, "size": "s-1vcpu-1gb"}
        cfg["enclave:roles"]["mysql"]["ingress"].append({"from": "monitor", "ports": "tcp/9104"})

    new, diff = change_prod(monitoring)
    mysql = by_host(diff)["mysql-1"]
    assert mysql.sets == (SetChange(set_name("monitor"), "added", (new.addresses["monitor-1"].private,), ()),)
    ((sign, line), (forward_sign, forward)) = mysql.files[0].lines  # INPUT, and published container ports
    assert sign == "+" and "--dport 9104" in line and set_name("monitor") in line
    assert forward_sign == "+" and forward.startswith("-A ENCLAVE-FORWARD") and "--ctorigdstport 9104" in forward


def test_enabling_ipv6_adds_public_ipv6_rules() -> None:
    def ipv6(cfg: dict[str, Any]) -> None:
        cfg["enclave:roles"]["haproxy-www"]["ipv6"] = True

    _, diff = change_prod(ipv6)
    files = {f.file: f for f in by_host(diff)["haproxy-www-1"].files}
    assert set(files) == {"rules.v6"}
    assert any(sign == "+" and "--dport 80 " in line for sign, line in files["rules.v6"].lines)


def test_a_new_vpc_range_readdresses_every_host() -> None:
    def move(cfg: dict[str, Any]) -> None:
        cfg["enclave:vpcIpRange"] = "10.130.0.0/24"

    _, diff = change_prod(move)
    assert diff.readdressed and "vpcIpRange" in diff.notes[0]
    assert all(h.action == "update" for h in diff.hosts)


def test_parse_ipsets_reads_what_the_renderer_wrote() -> None:
    plan = build_plan(load_stack("prod"))
    sets = parse_ipsets(plan.files["mysql-1"].ipsets)
    assert set(sets) == set(plan.files["mysql-1"].set_names)  # the generation names, as they land
    wordpress = next(name for name in sets if base_name(name) == set_name("wordpress"))
    assert sets[wordpress][1] == tuple(plan.addresses[f"wordpress-{n}"].private for n in (1, 2))


# ------------------------------------------------------------------------------------------------ CLI


def write(tmp_path: Path, edit: Any, name: str = "Pulumi.prod.yaml") -> Path:
    doc = stack_document("prod")
    edit(doc["config"])
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_shows_the_change_like_a_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = write(tmp_path, scale_wordpress)
    assert main(["plan", "--stack-file", str(new), "--diff-from", str(PROD)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "+ wordpress-3 (role wordpress): create" in out
    mysql = lines.index("~ mysql-1 (role mysql): update")
    assert lines[mysql + 1].strip().startswith(f"~ set {set_name('wordpress')}: +10.")
    assert "rules.v4:" not in out  # no rule line changes anywhere
    assert lines[-1].startswith("hosts: 1 to create, 5 to update, 0 to delete, 1 unchanged")


def test_cli_port_change_prints_the_rule_lines_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def move_http(cfg: dict[str, Any]) -> None:
        cfg["enclave:roles"]["wordpress"]["ingress"][0]["ports"] = ["tcp/8080"]

    new = write(tmp_path, move_http)
    assert main(["plan", "--stack-file", str(new), "--diff-from", str(PROD), "--host", "wordpress-1"]) == 0
    out = capsys.readouterr().out
    minus = [line for line in out.splitlines() if line.lstrip().startswith("- -A ENCLAVE-INPUT ")]
    plus = [line for line in out.splitlines() if line.lstrip().startswith("+ -A ENCLAVE-INPUT ")]
    assert len(minus) == len(plus) == 1
    assert "--dport 80 " in minus[0] and '-j ACCEPT' in minus[0]  # never wrapped, whatever the terminal width
    assert "--dport 8080 " in plus[0] and "-j ACCEPT" in plus[0]
    assert "haproxy-www-1" not in out  # --host narrows the diff


def test_cli_json_and_no_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "prod", "--diff-from", str(PROD), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {h["action"] for h in data["hosts"]} == {"same"}
    assert data["summary"].startswith("hosts: 0 to create, 0 to update, 0 to delete, 6 unchanged")


def test_cli_deployed_addresses_are_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--addresses with --diff-from are the deployed hosts' addresses; a new host gets a free one."""
    deployed = {
        h: {"public": f"203.0.113.{10 + i}", "private": f"10.110.16.{100 + i}"}
        for i, h in enumerate(["tunnel-1", "haproxy-www-1", "wordpress-1", "wordpress-2", "mysql-1", "mysql-2"])
    }
    deployed["mysql-1"]["public6"] = "2001:db8::1"
    deployed["mysql-2"]["public6"] = "2001:db8::2"
    addresses = tmp_path / "addresses.json"
    addresses.write_text(json.dumps(deployed))
    new = write(tmp_path, scale_wordpress)
    argv = ["plan", "--stack-file", str(new), "--diff-from", str(PROD), "--addresses", str(addresses)]
    assert main([*argv, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    mysql = next(h for h in data["hosts"] if h["host"] == "mysql-1")
    (change,) = mysql["sets"]
    (joined,) = change["joined"]
    assert joined.startswith("10.110.16.") and joined not in {a["private"] for a in deployed.values()}
    assert all(h["action"] != "update" or not h["files"] for h in data["hosts"])


def test_cli_bad_old_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["plan", "--stack", "prod", "--diff-from", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--diff-from" in err and "nope.yaml does not exist" in err and "git show" in err
    broken = write(tmp_path, lambda cfg: cfg["enclave:roles"]["mysql"].update(count=-1), "old.yaml")
    assert main(["plan", "--stack", "prod", "--diff-from", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "old.yaml" in err and "enclave:roles.mysql.count" in err


def test_paths_with_brackets_print_verbatim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """File names are printed as they are: rich must not read `[/x]` in a path as a closing tag."""
    folder = tmp_path / "[/x]"
    folder.mkdir(parents=True)
    new = folder / "Pulumi.prod.yaml"
    new.write_text(PROD.read_text())
    assert main(["plan", "--stack-file", str(new), "--diff-from", str(PROD)]) == 0
    assert f"to {new}" in capsys.readouterr().out
    assert main(["diagram", "--stack-file", str(new), "--output", str(folder / "d")]) == 0
    assert f"wrote {folder / 'd'}.svg" in capsys.readouterr().out


def test_diff_work_does_not_grow_with_the_fleet_squared(monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan --diff-from` at 5 000 hosts took 318 s: every host re-parsed and compared every member of every set
    it holds. Counted, not timed: the ipsets files parsed stay the same number whatever the fleet's size (one
    per distinct file), so what grows with the fleet is one pass over each host's own files."""
    import enclave.diff as diff_module

    parsed: list[int] = []
    real_parse = diff_module.parse_ipsets

    def counting_parse(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
        parsed.append(len(text.splitlines()))
        return real_parse(text)

    monkeypatch.setattr(diff_module, "parse_ipsets", counting_parse)
    lines_parsed = {}
    for count in (20, 200):
        def scale(cfg: dict[str, Any], count: int = count) -> None:
            cfg["enclave:roles"]["wordpress"]["count"] = count
            cfg["enclave:roles"]["mysql"]["count"] = count
            cfg["enclave:vpcIpRange"] = "10.110.0.0/20"

        old_doc = stack_document("prod")
        scale(old_doc["config"])
        old_doc["config"]["enclave:tests"] = []
        new_doc = copy.deepcopy(old_doc)
        new_doc["config"]["enclave:roles"]["wordpress"]["count"] = count + 1
        parsed.clear()
        _, diff = compare_stacks(Stack("prod", config_of(new_doc)), config_of(old_doc))
        assert diff.count("create") == 1 and diff.members_joined > 0
        lines_parsed[count] = (len(parsed), sum(parsed))
    (calls_small, lines_small), (calls_big, lines_big) = lines_parsed[20], lines_parsed[200]
    assert calls_big == calls_small  # per distinct file, not per host
    assert lines_big <= 10 * lines_small * 1.2  # the files themselves grow with their members: linear


def test_set_changes_are_set_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Members that join or leave are found by hashing, not by scanning the other side (a tuple `in`)."""
    from enclave.diff import _set_changes
    from enclave.render import IpSet, render_ipsets

    def text(members: range) -> str:
        return render_ipsets([IpSet("enclave-web", "hash:ip", "inet", tuple(f"10.0.{m // 250}.{m % 250}" for m in members), "web")])

    comparisons = 0
    real_eq = str.__eq__

    class Member(str):
        def __eq__(self, other: object) -> bool:
            nonlocal comparisons
            comparisons += 1
            return real_eq(self, other)

        __hash__ = str.__hash__

    real_parse = parse_ipsets

    def parse_counting(source: str) -> dict[str, tuple[str, tuple[str, ...]]]:
        return {k: (t, tuple(Member(m) for m in ms)) for k, (t, ms) in real_parse(source).items()}

    import enclave.diff as diff_module

    monkeypatch.setattr(diff_module, "parse_ipsets", parse_counting)
    counts = {}
    for size in (500, 5000):
        comparisons = 0
        (change,) = _set_changes(text(range(size)), text(range(1, size + 1)))
        assert len(change.joined) == 1 and len(change.left) == 1
        counts[size] = comparisons
    assert counts[5000] <= 11 * counts[500]  # linear: 10 times the members, 10 times the work (a tuple scan: 100)
