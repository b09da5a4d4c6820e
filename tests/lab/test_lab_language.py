"""Issue 19's keys with real packets: egress allowlists allowed and denied (to the Internet, a test CIDR and other
hosts), `from: all` (a role added later included), and a wrong egress rule caught naming its entry. Needs root."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import pytest
from rich.console import Console

from config.schema import enclave_keys, load_config
from config.stackfile import Stack, load_stack
from enclave.lab.lab import Lab
from enclave.lab.probe import LabReport
from enclave.lab.report import print_report
from enclave.render import RuleFiles

from ..conftest import pushed_lab, stack_document
from .test_lab import _unavailable


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=f"lab unavailable: {_unavailable()}")


@pytest.fixture(scope="module")
def shop_lab(run_ids: list[str]) -> Iterator[Lab]:
    with pushed_lab(load_stack("shop"), run_ids) as lab:
        yield lab


def seen(report: LabReport) -> dict[tuple[str, str, str, str], bool]:
    """(source, destination, address kind, port) -> whether the real packet got through."""
    return {(o.probe.source.name, o.probe.target.host, o.probe.target.kind, str(o.probe.port)): o.passed
            for o in report.outcomes}


def test_shop_lab_matches_its_policy_with_egress_to_the_internet(shop_lab: Lab) -> None:
    report = shop_lab.probe()
    assert report.ok, "\n".join(o.describe() for o in report.mismatches) + "\n".join(report.harness)
    got = seen(report)
    # the worker's allowlist: https out, nothing else; the CIDR a test names answers as the Internet does
    assert got[("worker-1", "internet", "public", "tcp/443")] is True
    assert got[("worker-2", "203.0.113.0/24", "public", "tcp/443")] is True
    assert got[("worker-1", "internet", "public", "tcp/25")] is False
    assert got[("worker-1", "internet", "public", "udp/443")] is False
    # egress: [] and an allowlist without internet: no new connection out, though the Internet answers
    assert got[("pg-1", "internet", "public", "tcp/80")] is False
    assert got[("api-2", "internet", "public", "tcp/443")] is False
    # the source's egress counts between hosts too: the edge admits the Internet, api may not go there
    assert got[("api-1", "edge-1", "public", "tcp/443")] is False
    assert got[("worker-1", "edge-2", "public", "tcp/443")] is True
    # what peers admit stays open on the private side: replication, statsd to metrics `from: all`
    assert got[("pg-2", "pg-1", "private", "tcp/5432")] is True
    assert got[("pg-1", "pg-2", "private", "tcp/5432")] is False  # only the replica dials
    for source in ("bastion-1", "edge-1", "api-2", "pg-1", "redis-1", "worker-2"):
        assert got[(source, "metrics-1", "private", "udp/8125")] is True, source
    assert got[("neighbor", "metrics-1", "private", "udp/8125")] is False
    assert got[("internet", "metrics-1", "public", "udp/8125")] is False
    assert [t.passed for t in report.tests] == [True] * len(shop_lab.stack.config.tests)
    console = Console(record=True, width=200, file=io.StringIO())
    print_report(report, console)
    egress = console.export_text().split("what each role's egress let out")[1].split("\n\n")[0]
    worker_row = next(line for line in egress.splitlines() if line.startswith("│ worker"))
    assert "tcp 443" in worker_row and "25" not in worker_row


def test_the_internet_answers_on_every_probed_port(shop_lab: Lab) -> None:
    """metrics is `restricted` (the public side open): every probe it sends to the Internet gets an answer, so a
    dropped egress probe elsewhere is the rules' doing, not a silent Internet."""
    report = shop_lab.probe()
    to_internet = [o for o in report.outcomes if o.probe.source.name == "metrics-1" and o.probe.target.host == "internet"]
    assert {o.probe.port for o in to_internet} == set(report.probe_set.ports)
    assert [o.describe() for o in to_internet if not o.passed] == []


def _with_line(files: RuleFiles, before: str, line: str | None, drop: str | None = None) -> RuleFiles:
    lines = files.ipv4.splitlines(keepends=True)
    kept = [x for x in lines if drop is None or drop not in x]
    at = next(i for i, x in enumerate(kept) if before in x)
    extra = [line + "\n"] if line else []
    return dataclasses.replace(files, ipv4="".join(kept[:at] + extra + kept[at:]))


def test_a_missing_or_widened_egress_rule_is_caught_by_real_packets(shop_lab: Lab) -> None:
    worker, pg = shop_lab.files["worker-1"], shop_lab.files["pg-1"]
    drop = '"egress allowlist: default drop"'
    try:
        shop_lab.push("worker-1", _with_line(worker, drop, None, drop="roles.worker.egress[0]"))
        shop_lab.push("pg-1", _with_line(pg, drop, "-A ENCLAVE-OUTPUT -o eth0 -j ACCEPT"))
        report = shop_lab.probe()
    finally:
        shop_lab.push("worker-1", worker)
        shop_lab.push("pg-1", pg)
    wrong = {(o.probe.source.name, o.probe.target.host, str(o.probe.port)): o for o in report.mismatches}
    missing = wrong[("worker-1", "internet", "tcp/443")]
    assert missing.probe.expected is not None and missing.probe.expected.why == "roles.worker.egress[0]"
    assert not missing.passed
    widened = wrong[("pg-1", "internet", "tcp/80")]
    assert widened.passed and widened.probe.expected is None
    assert not any(t.passed for t in report.tests if t.test.sources == "worker" and t.test.ports[0].low == 443)
    assert shop_lab.probe().ok  # the right rules, pushed back, are right again


def test_a_role_added_later_reaches_from_all_with_no_edit(run_ids: list[str]) -> None:
    doc = stack_document("shop")
    doc["config"]["enclave:roles"]["search"] = {"count": 1, "size": "s-1vcpu-1gb", "egress": []}
    doc["config"]["enclave:roles"]["worker"]["count"] = 1
    doc["config"]["enclave:roles"]["edge"]["count"] = 1
    stack = Stack("shop", load_config(enclave_keys(doc["config"])))
    with pushed_lab(stack, run_ids) as lab:
        report = lab.probe()
    assert report.ok, "\n".join(o.describe() for o in report.mismatches) + "\n".join(report.harness)
    got = seen(report)
    assert got[("search-1", "metrics-1", "private", "udp/8125")] is True
    assert got[("search-1", "internet", "public", "udp/123")] is True  # an essential, kept by `egress: []`
    assert got[("search-1", "internet", "public", "tcp/443")] is False
