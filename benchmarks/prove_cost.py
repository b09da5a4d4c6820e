"""Proof cost: `enclave prove` on prod-shaped fleets, beside what `enclave plan` takes for the same fleet.

Run: `python -m benchmarks.prove_cost [--sizes 100,1000,5000,10000] [--rounds 3]` (one process, one core).
Sizes over the schema's limit on set members in all (10 000) are measured with the limit lifted in this process.
"plan" is build_plan (compile, addresses, render, the stack's tests); "prove" is proving every host's rendered
files against the policy, identical file sets once; "distinct" file sets are proved (the rest are found equal to one of them); "atoms" are the classes of packets
evaluated for them in all.
"""

from __future__ import annotations

import argparse
import time

import config.schema
from enclave.plan import build_plan
from enclave.verify.prove import HostText, Prover

from .fleet import prod_shaped_stack
from .report import median

DEFAULT_SIZES = (100, 1000, 5000, 10000)


def measure(hosts: int, rounds: int) -> dict[str, float]:
    # A prod-shaped 10 000-host fleet carries ~74 million set members, over the schema's limit (README: Limits):
    # the limit is lifted in this process only, to measure the verifier at the size issue 18 names.
    config.schema.MAX_SET_MEMBERS = max(config.schema.MAX_SET_MEMBERS, 10 * hosts * hosts)
    stack = prod_shaped_stack(hosts)
    plan_s, prove_s = [], []
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
    return {"hosts": hosts, "plan": median(plan_s), "prove": median(prove_s), "distinct": distinct, "atoms": atoms}


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
