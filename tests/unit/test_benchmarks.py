"""The benchmark scripts still run (at a tiny size; timings are printed by `make bench`, never asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import apply_cost, dataplane, plan_cost
from benchmarks.__main__ import main, write_report
from benchmarks.fleet import peers_stack, prod_shaped_stack
from benchmarks.report import Spread, bootstrap_median
from benchmarks.rulesets import enclave_files
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


def test_report_keeps_the_figures_measured_by_hand(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    write_report(report, {"plan": "plan table v1\n"}, ["cores: 2"])
    report.write_text(report.read_text() + "\n<!-- notes -->\n## By hand\n28 ms\n<!-- /notes -->\n")
    write_report(report, {"plan": "plan table v2\n"}, ["cores: 4"])
    text = report.read_text()
    assert "plan table v2" in text and text.count("## By hand\n28 ms") == 1


def test_cli_runs_the_plan_part_and_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "out.md"
    assert main(["plan", "--plan-sizes", "10", "--output", str(report)]) == 0
    assert "Rules per host by fleet size" in report.read_text()


def test_cli_names_an_unknown_part() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plans"])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------- figures and their noise


def test_a_figure_carries_its_interval_and_rounds() -> None:
    figure = Spread.iqr([0.070, 0.074, 0.076, 0.080, 0.120])
    assert (figure.median, figure.rounds) == (0.076, 5)
    assert figure.low == 0.074 and figure.high == 0.080  # the quartiles: one slow round does not move them
    assert figure.ms() == "76 ms (74–80 ms)"
    low, high = bootstrap_median([0.97, 0.98, 0.99, 1.00, 1.01, 0.98, 0.99])
    assert 0.97 <= low <= 0.99 <= high <= 1.01


def _variant(name: str, ratios: list[float]) -> dataplane.Variant:
    """A variant as measured: each slice's TCP rate over the floor slices around it (UDP left at 100%)."""
    v = dataplane.Variant(name, lambda pair: None)
    v.tcp, v.udp = [10_000 * r for r in ratios], [100_000.0] * len(ratios)
    v.tcp_ratios, v.udp_ratios = ratios, [1.0] * len(ratios)
    return v


def test_a_ratio_within_the_floors_own_noise_is_not_reported_as_better_than_the_floor() -> None:
    """The "102% of the floor" finding: enclave over the floor, by less than the floor differs from itself."""
    aa = [1.03, 1.00, 0.99, 1.04, 0.98]  # the floor against itself: up to ±4% from round to round
    enclave = [1.02, 1.02, 1.01, 1.02, 1.03]  # about 102%
    table = dataplane._table([_variant("floor", [1.0] * 5), _variant(dataplane.AA, aa),
                              _variant("enclave, 10,000 peers", enclave)], rounds=5, seconds=1)
    row = next(r for r in table.rows if r[0] == "enclave, 10,000 peers")
    assert row[2].startswith("≈ floor") and row[5] == "5"
    assert any(note.startswith("Noise (A/A)") for note in table.notes)
    verdict = next(note for note in table.notes if note.startswith("enclave, 10,000 peers"))
    assert "**met**" in verdict  # its whole interval is above 95%


def test_a_target_is_met_only_when_the_whole_interval_clears_it() -> None:
    aa = [1.00, 1.01, 0.99, 1.005, 0.995, 1.00, 1.00]
    straddles = [0.90, 0.98, 0.93, 0.97, 0.94, 0.96, 0.95]  # 90–98%
    table = dataplane._table([_variant("floor", [1.0] * 7), _variant(dataplane.AA, aa),
                              _variant("enclave, 1,000 peers", straddles)], rounds=7, seconds=1)
    verdict = next(note for note in table.notes if note.startswith("enclave, 1,000 peers"))
    assert "**not shown at this noise**" in verdict
    row = next(r for r in table.rows if r[0] == "enclave, 1,000 peers")
    assert row[2].startswith("95% (")  # 5% under the floor, outside the A/A noise (±1%): a plain ratio
    missed = dataplane._table([_variant("floor", [1.0] * 7), _variant(dataplane.AA, aa),
                               _variant("enclave, 1,000 peers", [r - 0.1 for r in straddles])], rounds=7, seconds=1)
    assert "**MISSED**" in next(n for n in missed.notes if n.startswith("enclave, 1,000 peers"))


def test_the_load_puts_rules_in_force_with_the_jumps() -> None:
    """The "full load 62 ms" finding: the timed load must contain the jumps to enclave's chains, per family."""
    fleet = enclave_files(10, "10.0.200.2", "10.0.200.1", "eth1")
    script = apply_cost.load_script(fleet.files)
    for restore in ("iptables-restore", "ip6tables-restore"):
        part = script.split(f"{restore} -w --noflush <<'EOF'\n")[1].split("EOF\n")[0]
        assert "-I INPUT 1 -j ENCLAVE-INPUT\n" in part and "-I OUTPUT 1 -j ENCLAVE-OUTPUT\n" in part
        assert part.endswith("COMMIT\n") and part.count("COMMIT") == 1


def test_no_target_is_met_when_the_floor_against_itself_moves_more_than_the_margin() -> None:
    noisy_aa = [0.90, 1.10, 0.92, 1.08, 1.00]  # ±10%: the method cannot resolve the 5% the target is about
    enclave = [0.99, 1.00, 0.98, 0.99, 1.00]
    table = dataplane._table([_variant("floor", [1.0] * 5), _variant(dataplane.AA, noisy_aa),
                              _variant("enclave, 10,000 peers", enclave)], rounds=5, seconds=1)
    verdict = next(note for note in table.notes if note.startswith("enclave, 10,000 peers"))
    assert "**not shown at this noise (A/A ±" in verdict
    row = next(r for r in table.rows if r[0] == "enclave, 10,000 peers")
    assert row[2].endswith(", within A/A noise")  # 99%, but the method moves ±10% on its own
