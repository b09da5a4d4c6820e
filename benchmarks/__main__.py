"""`python -m benchmarks [PART ...]`: run benchmarks, print their tables, update docs/benchmarks.md.

Parts: plan (compile + render by fleet size), dataplane (new connections and packets through the rules; root),
apply (loading rules; root), program (the Pulumi program under mocks, and which pushes re-run on scaling),
push (a fleet's pushes in the lab at the engine's parallelism; root, under `flock /tmp/enclave-heavy.lock`),
lab (`enclave lab check` from 6 to 1 000 hosts; root, heavy: run it under `flock /tmp/enclave-heavy.lock`),
prove (`enclave prove` and the tests' proof by fleet size, one core; no root).
With no part, all of them. Each part replaces only its own section of the report, so parts can be rerun alone.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import apply_cost, dataplane, lab_cost, plan_cost, program_cost, prove_cost, push_cost
from .netns import BenchError
from .report import Table, machine_facts

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks.md"
PARTS = ("plan", "prove", "dataplane", "apply", "program", "push", "lab")
# Figures measured by hand (a benchmark `make bench` does not run, e.g. benchmarks.push_transaction), kept as
# they are between these markers at the end of the report.
NOTES = re.compile(r"<!-- notes -->\n.*?<!-- /notes -->\n", re.S)

HEADER = """# Benchmarks

Figures from `make bench` (as root; `python -m benchmarks --help` for parts and a quick run), written by
`benchmarks/` — rerun it to check them on your machine. Targets come from issue 6: rules per host constant in
fleet size, 5 000 hosts compiled and rendered in under 5 s, the mocked program at 1 000 hosts in under 60 s,
enclave keeping ≥ 95% of the floor's new-connection rate at 10 000 peers, a full apply in ≤ 100 ms at
10 000 peers, and adding a host re-running only the pushes of hosts that accept traffic from its role.

The machine is shared (other work runs beside the benchmarks), so the data-plane figures are medians of
interleaved rounds and ratios to a reference measured in the same rounds; absolute rates move from run to run.

Last run on:
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x.replace("_", "")) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give sizes as comma-separated numbers, e.g. 10,100,1000") from None


def _section(part: str, body: str) -> str:
    return f"<!-- bench:{part} -->\n{body}<!-- /bench:{part} -->\n"


def write_report(path: Path, sections: dict[str, str], facts: list[str]) -> None:
    old = path.read_text() if path.exists() else ""
    kept = {
        part: m.group(0)
        for part in PARTS
        if (m := re.search(rf"<!-- bench:{part} -->\n.*?<!-- /bench:{part} -->\n", old, re.S))
    }
    kept.update({part: _section(part, body) for part, body in sections.items()})
    text = HEADER + "".join(f"- {fact}\n" for fact in facts) + "\n"
    text += "\n".join(kept[part] for part in PARTS if part in kept)
    notes = NOTES.search(old)
    if notes:
        text += "\n" + notes.group(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and sizes (about a minute): to try the scripts, not to quote figures")
    parser.add_argument("--plan-sizes", type=_ints, help="hosts per plan stack (default 10,100,1000,5000)")
    parser.add_argument("--program-sizes", type=_ints, help="hosts per mocked program run (default 10,100,1000,3000)")
    parser.add_argument("--lab-sizes", type=_ints, help="hosts per lab run (default 6,20,100,200,1000)")
    parser.add_argument("--peers", type=_ints, help="peers admitted in the data-plane and apply runs (default 1000,10000)")
    parser.add_argument("--push-sizes", type=_ints, help="hosts per lab push run (default 100; quick 20)")
    parser.add_argument("--rounds", type=int, help="data-plane rounds (default 15, quick 3)")
    parser.add_argument("--output", type=Path, default=REPORT, help=f"report to update (default {REPORT.relative_to(ROOT)})")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    parts = args.parts or list(PARTS)
    quick = args.quick
    peers = args.peers or (1000, 10000)
    jobs: dict[str, Callable[[], list[Table]]] = {
        "plan": lambda: plan_cost.run(args.plan_sizes or plan_cost.DEFAULT_SIZES, rounds=1 if quick else 3),
        "dataplane": lambda: dataplane.run(peers, rounds=args.rounds or (3 if quick else 15), seconds=1),
        "apply": lambda: apply_cost.run(peers, rounds=2 if quick else 5, quick=quick),
        "push": lambda: push_cost.run(args.push_sizes or ((20,) if quick else push_cost.DEFAULT_SIZES)),
        "program": lambda: program_cost.run(args.program_sizes or ((10, 100) if quick else program_cost.DEFAULT_SIZES)),
        "lab": lambda: lab_cost.run(args.lab_sizes or ((6, 20) if quick else lab_cost.DEFAULT_SIZES)),
        "prove": lambda: prove_cost.run((100, 1000) if quick else prove_cost.DEFAULT_SIZES, rounds=1 if quick else 3),
    }
    facts = machine_facts()
    for fact in facts:
        print(fact)
    sections: dict[str, str] = {}
    failed = False
    for part in parts:
        start = time.perf_counter()
        try:
            tables = jobs[part]()
        except BenchError as exc:
            print(f"benchmark {part}: {exc}", file=sys.stderr)
            failed = True
            continue
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        took = time.perf_counter() - start
        body = "".join(t.markdown() + "\n" for t in tables)
        body += f"*{part}: measured {stamp} in {took:.0f} s{' (quick run)' if quick else ''}.*\n\n"
        print("\n" + body)
        sections[part] = body
    if sections and not args.no_write:
        write_report(args.output, sections, facts)
        print(f"wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
