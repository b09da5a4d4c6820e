"""The benchmark scripts still run (at a tiny size; timings are printed by `make bench`, never asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import plan_cost
from benchmarks.__main__ import main, write_report
from benchmarks.fleet import peers_stack, prod_shaped_stack
from config.stackfile import load_stack
from enclave.compiler import compile_policy


@pytest.mark.parametrize("hosts", [10, 37, 1000])
def test_generated_stacks_have_the_size_asked_and_prods_roles(hosts: int) -> None:
    stack = prod_shaped_stack(hosts).config
    prod = load_stack("prod").config
    assert sum(role.count for role in stack.roles.values()) == hosts
    assert list(stack.roles) == list(prod.roles)
    for name, role in stack.roles.items():  # same declarations, other counts
        assert role.model_copy(update={"count": 0}) == prod.roles[name].model_copy(update={"count": 0})


def test_peers_stack_admits_all_peers_in_one_from() -> None:
    whole = compile_policy(peers_stack(10_000, 8080, private_interface="eth1"))
    assert [f.source.name for f in whole.flows_to_role["server"]] == ["tunnel", "peer-a"]
    split = compile_policy(peers_stack(2_001, 8080, private_interface="eth1", per_role=1_000))
    assert [f.source.name for f in split.flows_to_role["server"]][1:] == ["peer-a", "peer-b", "peer-c"]
    assert [h.role for h in split.hosts].count("peer-c") == 1


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
