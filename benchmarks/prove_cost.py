"""Proof cost: `enclave prove` on prod-shaped fleets, beside what `enclave plan` takes for the same fleet.

Run: `python -m benchmarks.prove_cost [--sizes 100,1000,5000,10000] [--rounds 3]` (one process, one core).
Sizes over the schema's limit on set members in all (10 000) are measured with the limit lifted in this process.
"plan" is build_plan (compile, addresses, render, the stack's tests); "prove" is proving every host's rendered
files against the policy, identical file sets once; "distinct" file sets are proved (the rest are found equal to
one of them); "atoms" are the classes of packets evaluated for them in all; "tests" is proving the stack's tests
for every packet (enclave.verify.stacktests, what `enclave plan` adds to build_plan).
Also a part of `python -m benchmarks` (`prove`), which writes the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import config.schema
from config.schema import load_config
from config.stackfile import Stack
from enclave.plan import build_plan
from enclave.verify.prove import HostText, Prover

from enclave.verify.stacktests import prove_tests

from .fleet import prod_shaped
from .report import Table, median

DEFAULT_SIZES = (100, 1000, 5000, 10000)
# prod's tests, and two fleet invariants over every address outside the VPC and operators, every port
INVARIANTS = [{"from": "outside", "to": "mysql", "port": "any", "expect": "deny"},
              {"from": "outside", "to": "wordpress", "port": "any", "expect": "deny"}]


def measure(hosts: int, rounds: int) -> dict[str, float]:
    # A prod-shaped 10 000-host fleet carries ~74 million set members, over the schema's limit (README: Limits):
    # the limit is lifted in this process only, to measure the verifier at the size issue 18 names.
    config.schema.MAX_SET_MEMBERS = max(config.schema.MAX_SET_MEMBERS, 10 * hosts * hosts)
    values = prod_shaped(hosts)
    values["tests"] = values.get("tests", []) + INVARIANTS
    stack = Stack("bench", load_config(values, f"generated {hosts}-host stack"))
    plan_s, prove_s, tests_s = [], [], []
    distinct = atoms = 0
    for _ in range(rounds):
        started = time.perf_counter()
        plan = build_plan(stack)
        plan_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        prover = Prover(plan.policy, plan.addresses)
        proofs = [prover.prove(HostText.of(files)) for files in plan.files.values()]
        prove_s.append(time.perf_counter() - started)
        if not all(p.proved for p in proofs):
            raise SystemExit(f"{hosts} hosts: not proved: {[p.host for p in proofs if not p.proved][:5]}")
        distinct = sum(not p.cached for p in proofs)
        atoms = sum(p.atoms for p in proofs if not p.cached)
        started = time.perf_counter()
        tests = prove_tests(plan.policy, plan.addresses, plan.files)
        tests_s.append(time.perf_counter() - started)
        if not all(t.passed for t in tests):
            raise SystemExit(f"{hosts} hosts: a test does not hold: {[t.describe() for t in tests if not t.passed]}")
    return {"hosts": hosts, "plan": median(plan_s), "prove": median(prove_s), "distinct": distinct, "atoms": atoms,
            "tests": median(tests_s), "test_count": len(stack.config.tests)}


def run(sizes: tuple[int, ...] = DEFAULT_SIZES, rounds: int = 3) -> list[Table]:
    """The `prove` part of `python -m benchmarks`."""
    table = Table(
        "Proof cost: `enclave prove` by fleet size",
        "Generated prod-shaped stacks (`benchmarks/fleet.py`, as in *Plan cost*), one process, one core. *plan* is "
        "build_plan (compile, addresses, render, the tests judged by the policy); *prove* proves every host's "
        "rendered files equal to the policy for every packet, each distinct (files, role) pair once; *tests* proves "
        f"the stack's tests for every packet (what `enclave plan` adds). Medians of {rounds} round(s). Above 10 000 "
        "set members in all the schema's limit is lifted in the benchmark's process only.",
        ["hosts", "plan", "prove", "prove / plan", "distinct file sets", "classes of packets", "prove per host",
         "tests proved", "tests"],
    )
    for size in sizes:
        r = measure(size, rounds)
        print(f"prove: {size:>6,} hosts  plan {r['plan']:.2f} s  prove {r['prove']:.2f} s", flush=True)
        table.rows.append([f"{size:,}", f"{r['plan'] * 1000:,.0f} ms", f"**{r['prove'] * 1000:,.0f} ms**",
                           f"{r['prove'] / r['plan']:.2f}", f"{r['distinct']:,}", f"{r['atoms']:,}",
                           f"{1e6 * r['prove'] / size:,.0f} µs", f"{r['test_count']}", f"{r['tests'] * 1000:,.0f} ms"])
    largest = max(sizes)
    rows = {int(row[0].replace(",", "")): row for row in table.rows}
    if 5000 in rows:
        table.notes.append(f"5,000 hosts: prove/plan = {rows[5000][3]} (target: at most 1, issue 18).")
    if 10000 in rows:
        table.notes.append(f"10,000 hosts: proved in {rows[10000][2].strip('*')} (target: under 10 s on one core).")
    table.notes.append(f"Identical file sets are proved once: at {largest:,} hosts, {rows[largest][4]} distinct sets.")
    return [table]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'hosts':>7} {'plan s':>8} {'prove s':>8} {'prove/plan':>10} {'distinct':>8} {'atoms':>8} {'us/host':>8}")
    for size in (int(x) for x in args.sizes.split(",")):
        r = measure(size, args.rounds)
        print(f"{r['hosts']:>7} {r['plan']:>8.2f} {r['prove']:>8.2f} {r['prove'] / r['plan']:>10.2f} "
              f"{r['distinct']:>8} {r['atoms']:>8} {1e6 * r['prove'] / r['hosts']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
