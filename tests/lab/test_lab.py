"""The lab on real netfilter: dev and prod pass, a wrong rule or a wrong expectation fails naming the flow, and
nothing of any lab (namespace, process, interface) is left behind, also when a lab is interrupted.

Needs root and the lab's tools (`make setup` as root installs them). One prod lab is shared by the tests that
can take turns on it; dev labs are cheaper for the tests that need a lab of their own.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from config.stackfile import load_stack, load_stack_file
from enclave.cli import main
from enclave.lab import cli as lab_cli
from enclave.lab import lab as lab_module
from enclave.lab.lab import (LAB_DIR_ENV, Lab, LabError, LabUnavailable, invoking_user, lab_records, preflight,
                             run_namespaces)
from enclave.lab.probe import LabReport
from enclave.lab.report import print_report
from enclave.plan import build_plan
from enclave.push import digest
from enclave.render import RuleFiles

from ..conftest import ROOT, stack_document


def _unavailable() -> str | None:
    try:
        preflight()
    except LabUnavailable as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=f"lab unavailable: {_unavailable()}")


@pytest.fixture(scope="module")
def prod_lab(run_ids: list[str]) -> Iterator[Lab]:
    with Lab(load_stack("prod")) as lab:
        run_ids.append(lab.run_id)
        failures = lab.push_all()
        assert not failures, [str(f) for f in failures.values()]
        yield lab


def open_to_everyone(files: RuleFiles, *matches: str) -> RuleFiles:
    """The host's IPv4 file with ACCEPT rules for anyone inserted before its default drop."""
    lines = files.ipv4.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if '"default drop"' in line)
    extra = [f"-A ENCLAVE-INPUT {match} -j ACCEPT\n" for match in matches]
    return dataclasses.replace(files, ipv4="".join(lines[:at] + extra + lines[at:]))


def without_rule(files: RuleFiles, comment: str) -> RuleFiles:
    """The host's IPv4 file without one declaration's rule: its INPUT accept and its copy for published ports."""
    lines = files.ipv4.splitlines(keepends=True)
    kept = [line for line in lines if comment not in line]
    gone = [line.split()[1] for line in lines if comment in line]
    assert sorted(gone) in (["ENCLAVE-INPUT"], ["ENCLAVE-FORWARD", "ENCLAVE-INPUT"]), f"expected exactly one rule with {comment!r}"
    return dataclasses.replace(files, ipv4="".join(kept))


def rendered(report: LabReport) -> str:
    """The report as `enclave lab check` prints it."""
    console = Console(record=True, width=200, file=io.StringIO())
    print_report(report, console)
    return console.export_text()


# ---------------------------------------------------------------------------------------------- prod


def test_prod_lab_matches_its_compiled_policy(prod_lab: Lab) -> None:
    report = prod_lab.probe()
    assert report.ok, "\n".join(o.describe() for o in report.mismatches)
    assert len(report.outcomes) > 1000
    passed = {(o.probe.source.name, o.probe.target.host, o.probe.target.kind, str(o.probe.port))
              for o in report.outcomes if o.passed}
    # real packets got through where the policy admits them: the lab does not just drop everything
    assert ("operator", "tunnel-1", "public", "tcp/22") in passed
    assert ("tunnel-1", "mysql-2", "private", "tcp/22") in passed
    assert ("wordpress-1", "mysql-2", "private", "tcp/3306") in passed
    assert ("internet", "haproxy-www-1", "public", "tcp/80") in passed
    assert ("wordpress-2", "wordpress-1", "private", "tcp/49251") in passed
    assert any(o.probe.target.kind == "public6" for o in report.outcomes)
    assert [t.passed for t in report.tests] == [True] * len(prod_lab.stack.config.tests)
    assert "matches its policy" in rendered(report)


def test_prod_pushes_went_over_ssh_through_the_bastion(prod_lab: Lab) -> None:
    tunnel = prod_lab.addresses["tunnel-1"]
    log = (prod_lab.host_dir("mysql-1") / "sshd.log").read_text()
    assert f"Accepted publickey for root from {tunnel.private}" in log  # ProxyJump: the bastion dialed it
    assert f"Accepted publickey for root from {prod_lab.others.operator.address}" in (
        prod_lab.host_dir("tunnel-1") / "sshd.log"
    ).read_text()
    for host in ("tunnel-1", "mysql-1"):
        confirmed = prod_lab.state_dir(host) / "confirmed" / "digest"
        assert confirmed.read_text().strip() == digest(prod_lab.files[host])


def test_plan_host_shows_the_sets_ipset_lists_on_the_host_after_a_push(prod_lab: Lab,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`enclave plan --host mysql-1` prints what lands: the very set names `ipset list -n` shows there."""
    assert main(["plan", "--stack", "prod", "--host", "mysql-1"]) == 0
    ipsets = capsys.readouterr().out.split("### mysql-1: ipsets\n")[1].split("### ")[0]
    planned = sorted(line.split()[1] for line in ipsets.splitlines() if line.startswith("create "))
    listed = sorted(prod_lab.console("mysql-1", "ipset list -n").stdout.split())
    assert planned and listed == planned


def test_opening_3306_to_everyone_fails_naming_the_flows(prod_lab: Lab) -> None:
    original = prod_lab.files["mysql-1"]
    wide_open = open_to_everyone(
        original, "-p tcp -m tcp --dport 3306", "-p udp -m udp --dport 3306", "-p icmp -m icmp --icmp-type 8"
    )
    try:
        prod_lab.push("mysql-1", wide_open)  # over SSH through the bastion, as the program pushes
        report = prod_lab.probe()
    finally:
        prod_lab.push("mysql-1", original)
    assert not report.ok
    mysql_1 = prod_lab.addresses["mysql-1"]
    text = rendered(report)
    for flow in (
        f"neighbor -> mysql-1 {mysql_1.private} (private) tcp/3306: expected deny, seen allow (connected)",
        f"internet -> mysql-1 {mysql_1.public} (public) tcp/3306: expected deny, seen allow (connected)",
        f"neighbor -> mysql-1 {mysql_1.private} (private) udp/3306: expected deny, seen allow (reply)",
        f"tunnel-1 -> mysql-1 {mysql_1.private} (private) icmp: expected deny, seen allow (reply)",
    ):
        assert f"{flow}; nothing in the stack admits it, so no rule should" in text
    assert all(o.probe.target.host == "mysql-1" and o.passed for o in report.mismatches)
    # haproxy-www's restricted egress still keeps it from mysql-1's private address: dropped at the source
    flow = f"haproxy-www-1 -> mysql-1 {mysql_1.private} (private) tcp/3306"
    (haproxy,) = [o for o in report.outcomes if o.probe.describe() == flow]
    assert not haproxy.passed
    (neighbor_test,) = report.failed_tests
    assert neighbor_test.describe() == "tests[2]: neighbor -> mysql-1 tcp/3306 expect deny"
    assert prod_lab.probe().ok  # the original rules, pushed back, are right again


def test_a_rebooted_host_comes_back_with_its_confirmed_rules(prod_lab: Lab) -> None:
    confirmed = prod_lab.firewall_state("mysql-2")
    prod_lab.reboot("mysql-2")
    assert prod_lab.firewall_state("mysql-2") == confirmed  # exactly: iptables-save, ip6tables-save, ipsets
    # a NEW connection through the bastion reaches it, and its kernel has the confirmed rules again
    result = prod_lab.ssh("mysql-2", 'cat "$ENCLAVE_STATE_DIR/confirmed/digest"; iptables -S ENCLAVE-INPUT')
    assert result.returncode == 0, result.stderr
    assert digest(prod_lab.files["mysql-2"]) in result.stdout
    assert "ssh through bastion tunnel" in result.stdout
    assert prod_lab.probe().ok


# ----------------------------------------------------------------------------------------------- dev


def test_dropping_ssh_from_the_bastion_fails_the_push_and_names_the_flow(run_ids: list[str]) -> None:
    stack = load_stack("dev")
    broken = without_rule(build_plan(stack).files["mysql-1"], "ssh through bastion tunnel")
    with Lab(stack, files_override={"mysql-1": broken}) as lab:
        run_ids.append(lab.run_id)
        failures = lab.push_all()
        report = lab.probe()
    # the push applied, then the confirmation over a new connection could not get in
    assert list(failures) == ["mysql-1"] and failures["mysql-1"].step == "confirm"
    (mismatch,) = report.mismatches
    private = lab.addresses["mysql-1"].private
    assert mismatch.describe().startswith(f"tunnel-1 -> mysql-1 {private} (private) tcp/22: expected allow, seen deny")
    assert "the rule that should admit it: ssh through bastion tunnel" in mismatch.describe()
    text = rendered(report)
    assert "push failed: confirm to mysql-1 failed" in text and "FAILS" in text


def test_lab_up_keeps_a_lab_to_explore_and_down_removes_it(
    run_ids: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(LAB_DIR_ENV, str(tmp_path))
    assert main(["lab", "up", "--stack", "dev"]) == 0
    out = capsys.readouterr().out
    (record,) = lab_records(tmp_path)
    run_ids.append(record.run_id)
    assert "matches its policy" in out and f"enclave lab down {record.run_id}" in out
    assert len(run_namespaces(record.run_id)) == 1 + 4 + 3 + 1  # fabric, dev's four hosts, three outsiders, scratch
    # the printed ssh config works from the operator namespace, through the bastion, after the CLI exited
    ssh = ["ip", "netns", "exec", f"enc-{record.run_id}-operator", "ssh", "-F", record.ssh_config, "dev-mysql-1"]
    shown = subprocess.run([*ssh, "iptables -S ENCLAVE-INPUT"], capture_output=True, text=True, timeout=30)
    assert "ssh through bastion tunnel" in shown.stdout, shown.stderr
    assert main(["lab", "down"]) == 0
    assert f"lab {record.run_id}: removed 9 namespaces" in capsys.readouterr().out
    assert run_namespaces(record.run_id) == [] and not (tmp_path / record.run_id).exists()
    assert main(["lab", "down", "ffffff"]) == 2  # an unknown run id is named, not ignored


@pytest.mark.parametrize("run_id", ["..", "x/../.."])  # never "/": without the check that is rmtree("/")
def test_lab_down_refuses_a_run_id_that_is_a_path(
    run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lab down RUN_ID` deletes <lab root>/RUN_ID: a path there would have deleted the lab root's parents."""
    labs = tmp_path / "parent" / "labs"
    labs.mkdir(parents=True)
    (tmp_path / "parent" / "precious").write_text("kept")
    monkeypatch.setenv(LAB_DIR_ENV, str(labs))
    assert main(["lab", "down", run_id]) == 2
    assert "is not a lab run id" in capsys.readouterr().err
    assert (tmp_path / "parent" / "precious").read_text() == "kept" and labs.is_dir()


def test_a_wrong_expectation_fails_lab_check(
    run_ids: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(LAB_DIR_ENV, str(tmp_path))
    doc = stack_document("dev")
    doc["config"]["enclave:tests"].append({"from": "internet", "to": "wordpress", "port": "tcp/80", "expect": "allow"})
    path = tmp_path / "Pulumi.wrong.yaml"
    path.write_text(yaml.safe_dump(doc))
    code = main(["lab", "check", "--stack-file", str(path)])
    out, err = capsys.readouterr()
    run_ids.extend(re.findall(r"^lab ([0-9a-f]{6}):", out, re.M))
    assert code == 1
    assert "tests[4]: internet -> wordpress tcp/80 expect allow, but real packets say deny" in out
    assert "the compiled policy says deny too" in out
    assert "0 of " in out  # every probe agrees with the policy: it is the expectation that is wrong
    assert list(tmp_path.iterdir()) == [path]  # the lab was removed
    # stderr is no terminal here (as in CI): one plain line per phase, the report alone on stdout
    assert [line.split()[1] for line in err.splitlines() if line.startswith("lab: ")] == ["network", "boot", "push", "probe"]
    assert "4 of 4 hosts pushed and confirmed over SSH" in err and "lab: " not in out


def test_lab_check_json_lists_every_probe_with_both_verdicts_and_why(
    run_ids: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(LAB_DIR_ENV, str(tmp_path))
    assert main(["lab", "check", "--stack", "dev", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)  # stdout is the JSON alone; progress went to stderr
    run_ids.append(report["run"])
    assert "lab: probe" in err
    assert report["ok"] is True and report["stack"] == "dev"
    probes = report["probes"]
    summary = report["summary"]
    assert summary["probes"] == len(probes) and summary["mismatches"] == 0 and summary["pushFailures"] == 0
    assert summary["gotThrough"] == sum(p["seen"] == "allow" for p in probes) > 0
    haproxy = build_plan(load_stack("dev")).addresses["haproxy-www-1"].public
    (web,) = [p for p in probes if (p["src"], p["dst"], p["kind"], p["port"]) == ("internet", "haproxy-www-1", "public", "tcp/80")]
    assert web == {
        "src": "internet", "dst": "haproxy-www-1", "address": haproxy, "kind": "public", "port": "tcp/80",
        "expected": "allow", "seen": "allow", "matches": True, "detail": "connected",
        "why": "roles.haproxy-www.ingress[0]", "flow": "internet -> haproxy-www",
    }
    refused = [p for p in probes if p["src"] == "neighbor" and p["port"] == "tcp/3306"]
    assert refused and all(p["expected"] == p["seen"] == "deny" and p["why"] is None for p in refused)
    assert [t["passed"] for t in report["tests"]] == [True] * 4
    assert summary["mode"] == "exhaustive" and summary["hostsProven"] == 4 and report["harness"] == []
    # --sample on the command line: dev has one host per role, so the sample is every host, and it still passes
    assert main(["lab", "check", "--stack", "dev", "--sample", "--format", "json"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    run_ids.append(sampled["run"])
    assert sampled["summary"]["mode"] == "sampled" and sampled["ok"] is True
    # every host (the Internet is a destination too: the hosts' egress probes)
    assert sorted(sampled["summary"]["sampledHosts"]) == sorted({p["dst"] for p in probes} - {"internet"})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_lab_removes_everything(sig: signal.Signals, run_ids: list[str], tmp_path: Path) -> None:
    env = {**os.environ, LAB_DIR_ENV: str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "enclave.cli", "lab", "check", "--stack", "dev"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        # interrupt once processes run inside the lab's namespaces (the agents have their sockets)
        while not list(tmp_path.glob("*/agents/*.sock")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        (state,) = tmp_path.glob("*/lab.json")
        run_ids.append(state.parent.name)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted: the lab was removed" in err
    assert run_namespaces(state.parent.name) == [] and not state.parent.exists()


# ----------------------------------------------------------------------------------- verdicts at scale


def test_a_lab_that_cannot_resolve_its_neighbours_is_a_harness_failure_exit_3(
    run_ids: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a full neighbour table does to a namespace (its packets never leave, probes time out like drops),
    injected into one namespace of the lab: the run says the harness failed, exit 3, and blames no rule."""
    monkeypatch.setenv(LAB_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(lab_cli, "Lab", functools.partial(Lab, starve_neighbours=["mysql-1"]))
    code = main(["lab", "check", "--stack", "dev"])
    out, err = capsys.readouterr()
    run_ids.extend(re.findall(r"^lab ([0-9a-f]{6}):", out, re.M))
    assert code == 3
    assert "HARNESS FAILURE: this run cannot judge the rules" in out
    assert re.search(r"enc-[0-9a-f]{6}-mysql-1 could not resolve \d+ neighbour\(s\)", out)
    assert "no verdict on the rules (1 problem(s) above; exit 3)" in out.replace("\n", " ") or "exit 3" in out
    assert "the pushed rules are wrong" not in out and "FAILS" not in out
    assert "HARNESS FAILED" in err  # the probe phase says so too
    assert list(tmp_path.iterdir()) == []  # removed all the same


def test_a_sampled_lab_proves_every_host_from_its_kernel_not_only_the_probed_ones(
    run_ids: list[str], tmp_path: Path
) -> None:
    doc = stack_document("dev")
    doc["config"]["enclave:roles"]["wordpress"]["count"] = 3
    path = tmp_path / "Pulumi.three.yaml"
    path.write_text(yaml.safe_dump(doc))
    stack = load_stack_file(path)
    files = build_plan(stack).files
    # wordpress-2 is neither the first nor the last wordpress: no probe goes to or from it
    with Lab(stack, exhaustive=False, files_override={"wordpress-2": open_to_everyone(files["wordpress-2"], "-p tcp -m tcp --dport 4444")}) as lab:
        run_ids.append(lab.run_id)
        assert lab.sample is not None and "wordpress-2" not in lab.sample
        assert {"wordpress-1", "wordpress-3"} <= set(lab.sample)
        assert not lab.push_all()
        report = lab.probe()
    assert not report.harness and not report.mismatches  # the probes saw nothing wrong...
    (proof,) = report.failed_proofs  # ...the proof from its kernel did
    assert proof.host == "wordpress-2"
    assert "confirmed digest" in proof.detail and "+-A ENCLAVE-INPUT -p tcp -m tcp --dport 4444 -j ACCEPT" in proof.detail
    # the verifier proved the live rules against the policy, and its counterexample, sent as a real packet, got in
    assert "live rules NOT equal to the policy" in proof.detail
    sent = re.findall(r"IPv4 in \S+ [^;]* tcp/4444 NEW[^;]*; policy says deny [^;]*-> sent: [^;]*", proof.detail)
    assert sent and all("rules ACCEPT by line" in part and "-> sent: admitted" in part
                        and part.endswith(", as the verifier said") for part in sent), proof.detail
    assert all("live rules proved equal to the policy for every packet" in p.detail
               for p in report.host_proofs if p.host != "wordpress-2")
    assert len(report.host_proofs) == 6 and not report.ok
    text = rendered(report)
    assert "5 of 6 hosts: live rules, sets and digest" in text and "wordpress-2: confirmed digest" in text


def test_lab_down_all_removes_only_the_callers_labs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(LAB_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("SUDO_USER", raising=False)
    for run_id, user in (("aaa111", invoking_user()), ("bbb222", "someone-else")):
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "lab.json").write_text(json.dumps({
            "run_id": run_id, "stack": "dev", "owner_pid": 1, "kept": True, "namespaces": [],
            "ssh_config": "", "user": user}))
    assert main(["lab", "down", "--all"]) == 0
    out = capsys.readouterr().out
    assert "lab aaa111: removed" in out and "left 1 lab(s) of other users alone: bbb222 (someone-else)" in out
    assert not (tmp_path / "aaa111").exists() and (tmp_path / "bbb222" / "lab.json").exists()
    assert main(["lab", "down", "bbb222"]) == 0  # named, it is removed: the run id says which lab on purpose
    assert not (tmp_path / "bbb222").exists()


def test_a_failing_lab_reports_its_own_error_even_when_the_teardown_fails_too(
    run_ids: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_destroy = lab_module.destroy_run

    def destroy_then_complain(run_id: str, root: Path | None = None) -> list[str]:
        real_destroy(run_id, root)
        raise LabError("teardown trouble")

    def boot_fails(self: Lab, names: object, timeout: float | None = None) -> None:
        raise LabError("sshd in the lab did not start: original cause")

    monkeypatch.setattr(lab_module, "destroy_run", destroy_then_complain)
    monkeypatch.setattr(Lab, "_wait_until_ready", boot_fails)
    lab = Lab(load_stack("dev"))
    run_ids.append(lab.run_id)
    with pytest.raises(LabError, match="original cause") as raised:
        with lab:
            pass
    assert "teardown failed too: teardown trouble" in "".join(getattr(raised.value, "__notes__", []))
    assert run_namespaces(lab.run_id) == []
