"""Plan cost: time and peak memory of load + compile + render (+ push scripts, + the stack's tests) by fleet size.

Run: `python -m benchmarks plan [--sizes 10,100,1000,5000] [--rounds 3]`. Each stage is timed on its own
(median of the rounds), then one more round runs under tracemalloc for the peak of Python allocations.
Rules per host are counted for every host; in a prod-shaped fleet they must not change with size.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

from config.schema import load_config
from enclave.compiler import compile_policy
from enclave.plan import evaluate_tests, example_addresses
from enclave.push import push_script
from enclave.render import Renderer

from .fleet import prod_shaped
from .report import Table, median, mib, ms

STAGES = ("load", "compile", "addresses", "render", "push scripts", "tests")
DEFAULT_SIZES = (10, 100, 1000, 5000)


@dataclass
class SizeResult:
    hosts: int
    seconds: dict[str, float]
    peak_bytes: int
    rules_by_role: dict[str, tuple[int, int]]  # role -> (min, max) rules per host
    script_max_bytes: int
    script_total_bytes: int
    tests: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _one_round(values: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[stage] = now - clock
        clock = now

    stack = load_config(values, "generated stack")
    lap("load")
    policy = compile_policy(stack)
    lap("compile")
    addresses = example_addresses(policy)
    lap("addresses")
    files = Renderer(policy, addresses, "bench").render_all()
    lap("render")
    scripts = {name: push_script(f, "bench") for name, f in files.items()}
    lap("push scripts")
    results = evaluate_tests(policy, addresses)
    lap("tests")
    return times, {"policy": policy, "files": files, "scripts": scripts, "results": results}


def measure(hosts: int, rounds: int = 3) -> SizeResult:
    values = prod_shaped(hosts)
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    out: dict[str, Any] = {}
    for _ in range(rounds):
        gc.collect()
        times, out = _one_round(values)
        for stage in STAGES:
            samples[stage].append(times[stage])
    del out
    gc.collect()
    tracemalloc.start()
    _, out = _one_round(values)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    policy, files, scripts = out["policy"], out["files"], out["scripts"]
    by_role: dict[str, list[int]] = {}
    for host in policy.hosts:
        by_role.setdefault(host.role, []).append(files[host.name].rule_count)
    sizes = [len(s.encode()) for s in scripts.values()]
    return SizeResult(
        hosts=hosts,
        seconds={stage: median(samples[stage]) for stage in STAGES},
        peak_bytes=peak,
        rules_by_role={role: (min(counts), max(counts)) for role, counts in by_role.items()},
        script_max_bytes=max(sizes),
        script_total_bytes=sum(sizes),
        tests=len(out["results"]),
    )


def _span(pair: tuple[int, int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}–{pair[1]}"


def tables(results: list[SizeResult], rounds: int) -> list[Table]:
    cost = Table(
        "Plan cost: compile and render by fleet size",
        "Generated stacks with prod's roles and declarations, counts scaled (one bastion, a load balancer per 100 "
        "hosts, the rest half wordpress, half mysql; `benchmarks/fleet.py`), so every mysql host admits every "
        f"wordpress and mysql host. Stage times are medians of {rounds} round(s); peak memory is tracemalloc's peak of Python allocations "
        "over one whole round. *tests* evaluates the stack's `tests:` over every pair of hosts they name.",
        ["hosts", *STAGES, "total", "peak memory", "push script, largest", "push scripts, all hosts"],
    )
    for r in results:
        cost.rows.append(
            [f"{r.hosts:,}", *(ms(r.seconds[s]) for s in STAGES), f"**{ms(r.total)}**", mib(r.peak_bytes),
             f"{r.script_max_bytes / 1024:,.0f} KiB", mib(r.script_total_bytes)]
        )
    roles = sorted({role for r in results for role in r.rules_by_role})
    rules = Table(
        "Rules per host by fleet size",
        "iptables + ip6tables rules of each host (min–max over the hosts of a role). Peers live in "
        "ipsets, so a row that changes from column to column would be a scaling bug.",
        ["role", *(f"{r.hosts:,} hosts" for r in results)],
    )
    for role in roles:
        rules.rows.append([role, *(_span(r.rules_by_role.get(role, (0, 0))) for r in results)])
    constant = all(len({r.rules_by_role.get(role) for r in results}) == 1 for role in roles)
    rules.notes.append(f"constant in fleet size: **{'yes' if constant else 'NO'}**")
    big = results[-1]
    cost.notes.append(
        f"{big.hosts:,} hosts: {ms(big.total)} in all against the target of 5 s "
        f"(**{'met' if big.total < 5 else 'MISSED'}**)."
    )
    if len(results) >= 2:
        a, b = results[-2], results[-1]
        growth = b.total / a.total if a.total else float("inf")
        cost.notes.append(
            f"{a.hosts:,} → {b.hosts:,} hosts ({b.hosts / a.hosts:.0f}×): time ×{growth:.1f}. Push scripts grow "
            "with hosts × peers, because each host's ipset file lists its peers: that is the data a host firewall "
            "needs, while its rules stay flat."
        )
    return [cost, rules]


def run(sizes: tuple[int, ...] = DEFAULT_SIZES, rounds: int = 3, echo: bool = True) -> list[Table]:
    results = []
    for hosts in sizes:
        result = measure(hosts, rounds)
        if echo:
            print(f"plan: {hosts:>6,} hosts  total {ms(result.total):>9}  peak {mib(result.peak_bytes)}", flush=True)
        results.append(result)
    return tables(results, rounds)
