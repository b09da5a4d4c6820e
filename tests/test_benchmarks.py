"""The benchmark scripts still run (at a tiny size; timings are printed by `make bench`, never asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import plan_cost
from benchmarks.__main__ import main, write_report
from benchmarks.fleet import CELLS, MAX_PER_ROLE, peers_stack, prod_shaped_stack
from enclave.compiler import compile_policy


@pytest.mark.parametrize("hosts", [10, 37, 1000])
def test_generated_stacks_have_the_size_asked_and_prods_shape(hosts: int) -> None:
    stack = prod_shaped_stack(hosts).config
    assert sum(role.count for role in stack.roles.values()) == hosts
    assert all(role.count <= MAX_PER_ROLE for role in stack.roles.values())
    tiers = [name for name in stack.roles if name.startswith(("wordpress-", "mysql-"))]
    assert len(tiers) == 2 * CELLS
    # each cell's mysql admits its own wordpress and mysql, as prod's mysql does
    assert [r.sources for r in stack.roles["mysql-b"].ingress] == [["wordpress-b", "mysql-b"]]


def test_peers_stack_splits_peers_into_roles_within_the_count_limit() -> None:
    stack = peers_stack(2 * MAX_PER_ROLE + 1, 8080, private_interface="eth1")
    peers = {name: role.count for name, role in stack.roles.items() if name.startswith("peer-")}
    assert sum(peers.values()) == 2 * MAX_PER_ROLE + 1 and max(peers.values()) == MAX_PER_ROLE
    assert len(compile_policy(stack).flows_to_role["server"]) == 1 + len(peers)  # ssh via bastion + one per role


def test_plan_benchmark_reports_flat_rules_per_host(capsys: pytest.CaptureFixture[str]) -> None:
    cost, rules = plan_cost.run((10, 40), rounds=1)
    assert [row[0] for row in cost.rows] == ["10", "40"]
    assert {row[0] for row in rules.rows} == {"tunnel", "haproxy-www", "wordpress", "mysql"}
    assert "constant in fleet size: **yes**" in rules.notes
    assert "plan:" in capsys.readouterr().out


def test_report_keeps_the_sections_of_parts_not_rerun(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    write_report(report, {"plan": "plan table v1\n", "apply": "apply table\n"}, ["cores: 2"])
    write_report(report, {"plan": "plan table v2\n"}, ["cores: 4"])
    text = report.read_text()
    assert "plan table v2" in text and "plan table v1" not in text
    assert "apply table" in text and "- cores: 4" in text
    assert text.index("plan table") < text.index("apply table")


def test_cli_runs_the_plan_part_and_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "out.md"
    assert main(["plan", "--plan-sizes", "10", "--output", str(report)]) == 0
    assert "Rules per host by fleet size" in report.read_text()


def test_cli_names_an_unknown_part() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plans"])
    assert exc.value.code == 2
