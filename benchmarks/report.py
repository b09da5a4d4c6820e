"""Tables the benchmarks print and write to docs/benchmarks.md, and the machine facts they were measured on."""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
from dataclasses import dataclass, field


@dataclass
class Table:
    title: str
    intro: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.intro, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join(" ---: " if i else " --- " for i in range(len(self.columns))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def median(values: list[float]) -> float:
    return statistics.median(values)


def quartiles(values: list[float]) -> tuple[float, float]:
    """The interquartile range (first and third quartile; both the one value when there is one)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def bootstrap_median(values: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """A percentile-bootstrap interval for the median (the rounds resampled with replacement; fixed seed, so a
    report rerun on the same figures gives the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]


@dataclass(frozen=True)
class Spread:
    """A figure as the report gives it: the median over `rounds` rounds and an interval around it."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def iqr(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), *quartiles(values), len(values))

    @classmethod
    def bootstrap(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), *bootstrap_median(values), len(values))

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def ms(self) -> str:
        """`76 ms (72–80)`: median and interval in milliseconds."""
        return f"{ms(self.median)} ({ms(self.low).removesuffix(' ms')}–{ms(self.high)})"

    def rate(self) -> str:
        return f"{self.median:,.0f} ({self.low:,.0f}–{self.high:,.0f})"

    def percent(self) -> str:
        return f"{self.median:.0%} ({self.low:.0%}–{self.high:.0%})"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def _command(*argv: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def machine_facts() -> list[str]:
    """What the figures depend on; printed at the top of the report."""
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return [
        f"cores: {os.cpu_count()} ({cpu})",
        f"kernel: {platform.release()}",
        f"iptables: {_command('iptables', '--version')}",
        f"ipset: {_command('ipset', '--version')}",
        f"python: {platform.python_version()}",
        f"load average when the run started: {load}",
    ]
