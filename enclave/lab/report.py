"""The lab's verdict for a person: a matrix (sources x destination hosts), the stack's tests, the mismatches."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table
from rich.text import Text

from config.schema import PortSpec

from .probe import AddressKind, LabReport, Outcome, probe_numbers

SHORT: dict[AddressKind, str] = {"private": "priv", "public": "pub", "public6": "pub6"}
MAX_LISTED_MISMATCHES = 40


def port_summary(ports: list[PortSpec], declared: list[PortSpec]) -> str:
    """`tcp 22,80,49152-49251 udp 53 icmp`: a declared range shows as a range when all its probes got through."""
    parts = []
    for proto in ("tcp", "udp"):
        numbers = {p.low for p in ports if p.proto == proto}
        if not numbers:
            continue
        words: list[tuple[int, str]] = []
        for spec in declared:
            probed = set(probe_numbers(spec)) if spec.proto == proto and spec.low != spec.high else set()
            if len(probed) > 1 and probed <= numbers:
                words.append((spec.low, f"{spec.low}-{spec.high}"))
                numbers -= probed
        words += [(n, str(n)) for n in numbers]
        parts.append(f"{proto} " + ",".join(word for _, word in sorted(words)))
    if any(p.proto == "icmp" for p in ports):
        parts.append("icmp")
    return " ".join(parts)


def _cell(outcomes: list[Outcome], declared: list[PortSpec]) -> Text:
    if not outcomes:
        return Text("·", style="dim")
    text = Text()
    by_kind: dict[AddressKind, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_kind[o.probe.target.kind].append(o)
    for kind in ("private", "public", "public6"):
        group = by_kind.get(kind)
        if not group:
            continue
        passed = [o.probe.port for o in group if o.passed and o.matches]
        if text:
            text.append("\n")
        text.append(f"{SHORT[kind]} ", style="dim")
        text.append(port_summary(passed, declared) or "-", style="green" if passed else "dim")
        for o in group:
            if not o.matches:
                want, got = ("allow", "deny") if o.probe.expected else ("deny", "allow")
                text.append(f"\n✗ {SHORT[kind]} {o.probe.port}: expected {want}, seen {got}", style="bold red")
    return text


def matrix(report: LabReport) -> Table:
    ps = report.probe_set
    declared = ps.declared
    table = Table(
        title=f"stack {report.stack_name}: what got through, per source (rows) and destination host (columns)",
        title_justify="left",
        show_lines=True,
    )
    table.add_column("from \\ to", style="bold")
    for h in ps.hosts:
        table.add_column(h.name)
    cells: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for o in report.outcomes:
        cells[(o.probe.source.name, o.probe.target.host)].append(o)
    for src in ps.sources:
        label = src.name if src.kind == "host" else f"{src.name} ({src.address or src.address6})"
        table.add_row(label, *(_cell(cells[(src.name, h.name)], declared) for h in ps.hosts))
    return table


def tests_table(report: LabReport) -> Table:
    table = Table(title="the stack's tests, with real packets", title_justify="left")
    for column in ("test", "expect", "policy", "packets", "result", "detail"):
        table.add_column(column)
    by_index = {t.index: t for t in report.policy_tests}
    for t in report.tests:
        verdict = "[green]pass[/]" if t.passed else "[red bold]FAIL[/]"
        policy = by_index[t.index].seen if t.index in by_index else "?"
        table.add_row(t.describe(), t.test.expect, policy, t.seen, verdict, Text(t.detail))
    return table


def print_report(report: LabReport, console: Console) -> None:
    console.print(matrix(report))
    console.print(
        Text(
            "cells: the ports that got through, per address of the destination host: priv = private, pub = public "
            "IPv4, pub6 = public IPv6; '-' nothing got through, '·' not probed (the host itself); a red ✗ line is a "
            "mismatch. Probed on every address: every declared port over tcp and udp, ssh, port "
            f"{report.probe_set.never_declared} (declared nowhere) and icmp echo.",
            style="dim",
        )
    )
    if report.tests:
        console.print(tests_table(report))
    for failure in report.push_failures:
        console.print(Text(f"push failed: {failure}", style="bold red"))
    mismatches = report.mismatches
    if mismatches:
        console.print(f"[red bold]{len(mismatches)} probe(s) disagree with the compiled policy:[/]")
        for o in mismatches[:MAX_LISTED_MISMATCHES]:
            console.print(Text("  " + o.describe(), style="red"))
        if len(mismatches) > MAX_LISTED_MISMATCHES:
            console.print(f"  … and {len(mismatches) - MAX_LISTED_MISMATCHES} more")
    policy = {t.index: t for t in report.policy_tests}
    for t in report.failed_tests:
        by_policy = policy.get(t.index)
        if by_policy is not None and not by_policy.passed:
            blame = f"the compiled policy says {by_policy.seen} too: the expectation or the declarations are wrong"
        else:
            blame = "the compiled policy agrees with the test: the pushed rules are wrong"
        console.print(Text(f"{t.describe()}, but real packets say {t.seen} ({blame}): {t.detail}", style="red"))
    console.print(summary(report))


def summary(report: LabReport) -> Text:
    n = len(report.outcomes)
    allowed = sum(o.passed for o in report.outcomes)
    timings = ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in report.timings.items())
    total = sum(report.timings.values())
    tests = f"{sum(t.passed for t in report.tests)}/{len(report.tests)} tests pass with real packets"
    if report.push_failures:
        tests += f"; {len(report.push_failures)} push(es) failed"
    if report.ok:
        head = (
            f"lab {report.run_id}: stack {report.stack_name} matches its policy: {n} probes "
            f"({allowed} got through, {n - allowed} dropped), {tests}"
        )
        style = "bold green"
    else:
        head = (
            f"lab {report.run_id}: stack {report.stack_name} FAILS: {len(report.mismatches)} of {n} probes "
            f"disagree with the compiled policy, {tests}"
        )
        style = "bold red"
    return Text(f"{head}\ntime: {timings} (total {total:.1f} s)", style=style)
