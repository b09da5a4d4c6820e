"""Fleet invariants (`port: any`, port ranges, `from: outside`) and every stack test, proved for every packet by
the verifier at plan time: `enclave plan` reports them and exits 1 with a counterexample."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from config.schema import StackError
from config.stackfile import load_stack_file
from enclave.cli import main
from enclave.plan import build_plan
from enclave.verify.stacktests import prove_tests

PROD = Path(__file__).resolve().parent.parent.parent / "stacks" / "Pulumi.prod.yaml"


def stack_file(tmp_path: Path, tests: list[str], ingress: str = "") -> Path:
    """The prod stack with these tests (and, if given, one more ingress entry for wordpress)."""
    text = PROD.read_text()
    text = text.split("  enclave:tests:\n")[0] + "  enclave:tests:\n" + "".join(f"    - {t}\n" for t in tests)
    if ingress:
        text = text.replace("        - {from: haproxy-www, ports: [tcp/80]}\n",
                            "        - {from: haproxy-www, ports: [tcp/80]}\n" + f"        - {ingress}\n")
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(text)
    return path


INVARIANTS = [
    "{from: outside, to: mysql, port: any, expect: deny}",
    "{from: outside, to: wordpress, port: any, expect: deny}",
    "{from: outside, to: tunnel, port: tcp/22, expect: deny}",
    "{from: operators, to: tunnel, port: tcp/22, expect: allow}",
    "{from: outside, to: haproxy-www, port: tcp/80, expect: allow}",
    "{from: wordpress, to: wordpress, port: tcp/24007-24008, expect: allow}",
    "{from: neighbor, to: mysql, port: any, expect: deny}",
]


def test_fleet_invariants_are_proved_for_every_packet_by_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = stack_file(tmp_path, INVARIANTS)
    assert main(["plan", "--stack-file", str(path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(t["test"].split(": ")[1], t["proved"], t["seenByRules"]) for t in report["tests"]] == [
        ("outside -> mysql any expect deny", True, "deny"),
        ("outside -> wordpress any expect deny", True, "deny"),
        ("outside -> tunnel tcp/22 expect deny", True, "deny"),
        ("operators -> tunnel tcp/22 expect allow", True, "allow"),
        ("outside -> haproxy-www tcp/80 expect allow", True, "allow"),
        ("wordpress -> wordpress tcp/24007-24008 expect allow", True, "allow"),
        ("neighbor -> mysql any expect deny", True, "deny"),
    ]
    assert report["ok"] is True


def test_an_invariant_a_cidr_breaks_fails_plan_with_the_packet_the_sample_missed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The plan's stand-in outsider (192.0.2.10) is not in 203.0.113.0/24, so judged on it alone the test passes;
    # proved for every address outside the VPC and operators, it does not.
    path = stack_file(tmp_path, ["{from: outside, to: wordpress, port: any, expect: deny}"],
                      ingress="{from: 203.0.113.0/24, ports: [tcp/8443]}")
    assert main(["plan", "--stack-file", str(path)]) == 1
    out = capsys.readouterr().out
    assert "1 test(s) do not hold for every packet the rules see:" in out
    assert "tests[0]: outside -> wordpress any expect deny, but the rules make it mixed" in out
    assert "in eth0 203.0.113.0 -> " in out and "tcp/8443 NEW" in out and "wordpress-1 accepts it: line" in out
    assert "test(s) failed against the compiled policy" not in out  # the sample alone would have passed it


def test_a_port_range_test_half_open_is_mixed_with_the_first_closed_port(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = stack_file(tmp_path, ["{from: wordpress, to: wordpress, port: tcp/24000-24010, expect: allow}"])
    assert main(["plan", "--stack-file", str(path), "--format", "json"]) == 1
    (test,) = json.loads(capsys.readouterr().out)["tests"]
    assert (test["seen"], test["seenByRules"], test["proved"]) == ("mixed", "mixed", False)
    assert "tcp/24000 NEW" in test["counterexample"] and "drops it" in test["counterexample"]


def test_a_rule_file_bug_breaks_an_invariant_the_policy_keeps(tmp_path: Path) -> None:
    plan = build_plan(load_stack_file(stack_file(tmp_path, INVARIANTS[:1]), "prod"))
    files = dict(plan.files)
    bad = files["mysql-2"].ipv4.replace("-A ENCLAVE-INPUT -i lo -j ACCEPT\n",
                                        "-A ENCLAVE-INPUT -i lo -j ACCEPT\n-A ENCLAVE-INPUT -p udp -m udp --dport 161 -j ACCEPT\n")
    assert bad != files["mysql-2"].ipv4
    files["mysql-2"] = dataclasses.replace(files["mysql-2"], ipv4=bad)
    (proof,) = prove_tests(plan.policy, plan.addresses, files)
    assert (proof.passed, proof.seen) == (False, "mixed")
    assert "in eth0 192.0.2.10 -> 198.18.0.17 (mysql-2) udp/161 NEW (mysql-2 accepts it: line 12:" in proof.counterexample
    assert "--dport 161 -j ACCEPT" in proof.counterexample


@pytest.mark.parametrize("entry, key, message", [
    ("{from: mysql, to: outside, port: tcp/22, expect: deny}", "enclave:tests[0].to", "'outside' cannot be a destination"),
    ("{from: outside, to: mysql, port: every, expect: deny}", "enclave:tests[0].port", "is not a port"),
])
def test_bad_invariants_are_refused_naming_the_key(tmp_path: Path, entry: str, key: str, message: str) -> None:
    with pytest.raises(StackError) as caught:
        load_stack_file(stack_file(tmp_path, [entry]), "prod")
    assert [(i.path, message in i.message) for i in caught.value.issues] == [(key, True)], caught.value.issues


def test_outside_is_for_tests_only(tmp_path: Path) -> None:
    with pytest.raises(StackError) as caught:
        load_stack_file(stack_file(tmp_path, INVARIANTS[:1], ingress="{from: outside, ports: [tcp/80]}"), "prod")
    assert any("'outside' is only for tests" in i.message for i in caught.value.issues)


def test_a_test_to_the_internet_is_judged_by_the_sources_output_rules() -> None:
    """shop's `worker -> internet tcp/443 expect allow` holds on the rendered rules; with the allowlist's rule
    dropped from worker-2's files, the proof names worker-2 and the default drop that now decides it."""
    from config.stackfile import load_stack

    plan = build_plan(load_stack("shop"))
    index = next(i for i, t in enumerate(plan.policy.stack.tests) if (t.sources, t.to) == ("worker", "internet")
                 and t.expect == "allow")
    assert prove_tests(plan.policy, plan.addresses, plan.files)[index].passed
    files = dict(plan.files)
    lines = files["worker-2"].ipv4.splitlines(keepends=True)
    kept = [line for line in lines if not ("ENCLAVE-OUTPUT" in line and "--dport 443" in line and "egress[" in line)]
    assert len(kept) < len(lines)
    files["worker-2"] = dataclasses.replace(files["worker-2"], ipv4="".join(kept))
    proof = prove_tests(plan.policy, plan.addresses, files)[index]
    assert (proof.passed, proof.seen) == (False, "mixed")
    assert "(worker-2 drops it:" in proof.counterexample and "-> 192.0.2.10 tcp/443" in proof.counterexample
    assert "egress allowlist: default drop" in proof.counterexample
