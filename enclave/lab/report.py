"""The lab's verdict for a person: a matrix (sources x destination hosts), the stack's tests, the mismatches."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table
from rich.text import Text

from config.schema import PortSpec

from .probe import AddressKind, LabReport, Outcome, probe_numbers, source_group

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


CELL_WIDTH = 26  # what a host column needs to stay readable (`pub tcp 22,80 icmp` per line)


def fits(report: LabReport, width: int) -> bool:
    """Whether the host-by-host matrix fits a terminal this wide."""
    return 14 + CELL_WIDTH * len(report.probe_set.hosts) <= width


def role_matrix(report: LabReport) -> Table:
    """Sources grouped by role (outsiders alone) x destination roles: what got through from every probed pair
    of the group, and under it the hosts that did otherwise (each mismatch, named host to host)."""
    ps = report.probe_set
    roles = list(dict.fromkeys(h.role for h in ps.hosts))
    hosts_of = {r: [h.name for h in ps.hosts if h.role == r] for r in roles}
    sampled = "" if ps.exhaustive else " (sampled hosts)"
    table = Table(
        title=f"stack {report.stack_name}: what got through, per source role (rows) and destination role "
              f"(columns){sampled}",
        title_justify="left",
        show_lines=True,
    )
    table.add_column("from \\ to", style="bold")
    for r in roles:
        shown = hosts_of[r] if len(hosts_of[r]) <= 3 else [hosts_of[r][0], "…", hosts_of[r][-1]]
        table.add_column(f"{r} ({', '.join(shown)})")
    cells: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    role_of = {h.name: h.role for h in ps.hosts}
    for o in report.outcomes:
        if o.probe.target.host in role_of:  # the hosts' egress to the Internet: egress_matrix
            cells[(source_group(report, o.probe.source.name), role_of[o.probe.target.host])].append(o)
    rows = list(dict.fromkeys(source_group(report, s.name) for s in ps.sources))
    for row in rows:
        table.add_row(row, *(_group_cell(cells[(row, r)], ps.declared) for r in roles))
    return table


def egress_matrix(report: LabReport) -> Table | None:
    """Per source role: what got out to the Internet (and to the CIDRs stack tests send to), which answers on
    every probed port; None when nothing was probed there."""
    ps = report.probe_set
    role_of = {h.name: h.role for h in ps.hosts}
    outside = list(dict.fromkeys(o.probe.target.host for o in report.outcomes if o.probe.target.host not in role_of))
    if not outside:
        return None
    table = Table(title=f"stack {report.stack_name}: what each role's egress let out (the Internet answers on every "
                        "probed port)", title_justify="left", show_lines=True)
    table.add_column("from \\ to", style="bold")
    for name in outside:
        table.add_column(name)
    cells: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for o in report.outcomes:
        if o.probe.target.host not in role_of:
            cells[(source_group(report, o.probe.source.name), o.probe.target.host)].append(o)
    for row in dict.fromkeys(h.role for h in ps.hosts):
        table.add_row(row, *(_group_cell(cells[(row, name)], ps.declared) for name in outside))
    return table


def _group_cell(outcomes: list[Outcome], declared: list[PortSpec]) -> Text:
    if not outcomes:
        return Text("·", style="dim")
    text = Text()
    for kind in ("private", "public", "public6"):
        group = [o for o in outcomes if o.probe.target.kind == kind]
        if not group:
            continue
        passed = sorted({o.probe.port for o in group if o.passed and o.matches})
        if text:
            text.append("\n")
        text.append(f"{SHORT[kind]} ", style="dim")
        text.append(port_summary(passed, declared) or "-", style="green" if passed else "dim")
        wrong = [o for o in group if not o.matches]
        for o in wrong[:3]:
            want, got = ("allow", "deny") if o.probe.expected else ("deny", "allow")
            text.append(f"\n✗ {o.probe.source.name}->{o.probe.target.host} {o.probe.port}: expected {want}, seen {got}",
                        style="bold red")
        if len(wrong) > 3:
            text.append(f"\n✗ … {len(wrong) - 3} more", style="bold red")
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
    if report.harness:
        # First and alone: nothing below may be read as a verdict on the rules.
        console.print(Text("HARNESS FAILURE: this run cannot judge the rules (the probes below prove nothing "
                           "either way); fix the cause and run it again:", style="bold red"))
        for problem in report.harness:
            console.print(Text(f"  {problem}", style="red"))
    ps = report.probe_set
    by_host = fits(report, console.width)
    console.print(matrix(report) if by_host else role_matrix(report))
    egress = egress_matrix(report)
    if egress is not None:
        console.print(egress)
    where = "destination host" if by_host else "destination role, from every probed pair of the group"
    sample = ("" if ps.exhaustive else
              f" Sampled: probes from and to {', '.join(ps.sample or [])} (the first and last host of each role, "
              "and hosts named on their own); every other host is proven by its rules below.")
    console.print(
        Text(
            f"cells: the ports that got through, per address of the {where}: priv = private, pub = public "
            "IPv4, pub6 = public IPv6; '-' nothing got through, '·' not probed (the host itself, or no address "
            "to send to: a host with `public: false` has no public one); a red ✗ line is a mismatch. Probed on every address: every declared port over tcp and udp, ssh, port "
            f"{ps.never_declared} (declared nowhere) and icmp echo.{sample}",
            style="dim",
        )
    )
    proven = sum(p.ok for p in report.host_proofs)
    if report.host_proofs:
        console.print(Text(f"{proven} of {len(report.host_proofs)} hosts: live rules, sets and digest, read back "
                           "from the kernel, equal the compiled ones and are proved equal to the policy for every "
                           "packet", style="green" if proven == len(report.host_proofs) else "red"))
    for p in report.failed_proofs[:MAX_LISTED_MISMATCHES]:
        console.print(Text(f"  {p.host}: {p.detail}", style="red"))
    if len(report.failed_proofs) > MAX_LISTED_MISMATCHES:
        console.print(f"  … and {len(report.failed_proofs) - MAX_LISTED_MISMATCHES} more hosts")
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
        elif report.harness:
            blame = "but the harness failed: this proves nothing about the rules"
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
    if report.harness:
        head = (f"lab {report.run_id}: stack {report.stack_name}: HARNESS FAILURE, no verdict on the rules "
                f"({len(report.harness)} problem(s) above; exit 3)")
        style = "bold red"
    elif report.ok:
        head = (
            f"lab {report.run_id}: stack {report.stack_name} matches its policy: {n} probes "
            f"({allowed} got through, {n - allowed} dropped), {len(report.host_proofs)} hosts' rules proven, {tests}"
        )
        style = "bold green"
    else:
        head = (
            f"lab {report.run_id}: stack {report.stack_name} FAILS: {len(report.mismatches)} of {n} probes "
            f"disagree with the compiled policy, {len(report.failed_proofs)} host(s) differ from their compiled "
            f"rules, {tests}"
        )
        style = "bold red"
    return Text(f"{head}\ntime: {timings} (total {total:.1f} s)", style=style)
