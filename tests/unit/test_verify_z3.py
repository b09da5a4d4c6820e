"""Differential test against z3: an SMT encoding of the rules on raw packet fields (no atoms) as the oracle.

prod's rendered files are proved equal to the policy, so a mutated file equals the policy exactly when z3 finds
no packet on which it and the original decide differently. The verifier and z3 must agree on every mutation.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from config.stackfile import load_stack
from enclave.plan import build_plan
from enclave.verify.engine import resolve_set, with_push_jumps
from enclave.verify.parse import STATES, Cond, IpSetDef, Table, parse_ipsets, parse_tables
from enclave.verify.prove import HostText, Prover

from .test_verify_differential import mutate

z3: Any = pytest.importorskip("z3")

MUTATIONS = 40


class Fields:
    def __init__(self) -> None:
        self.iface = z3.String("iface")
        self.src, self.dst = z3.Int("src"), z3.Int("dst")
        self.proto, self.dport, self.sport = z3.Int("proto"), z3.Int("dport"), z3.Int("sport")
        self.icmp, self.state, self.hl = z3.Int("icmp"), z3.Int("state"), z3.Int("hl")

    def domain(self) -> Any:
        return z3.And(0 <= self.src, self.src < 2**32, 0 <= self.dst, self.dst < 2**32, 0 <= self.proto,
                      self.proto < 256, 0 <= self.dport, self.dport < 65536, 0 <= self.sport, self.sport < 65536,
                      -1 <= self.icmp, self.icmp < 256, 0 <= self.state, self.state < len(STATES), 0 <= self.hl,
                      self.hl < 256)


def condition(c: Cond, f: Fields, table: Table, sets: dict[str, IpSetDef]) -> Any:
    if c.kind in ("iface_in", "iface_out"):
        name = str(c.arg)
        e = z3.PrefixOf(z3.StringVal(name[:-1]), f.iface) if name.endswith("+") else f.iface == z3.StringVal(name)
    elif c.kind in ("src", "dst"):
        what, kind = c.arg
        intervals = [what] if kind == "net" else list(resolve_set(sets, str(what), table.family, table).members)
        field = f.src if c.kind == "src" else f.dst
        e = z3.Or([z3.And(lo <= field, field < hi) for lo, hi in intervals]) if intervals else z3.BoolVal(False)
    elif c.kind == "proto":
        e = f.proto == c.arg
    elif c.kind in ("dport", "sport"):
        field = f.dport if c.kind == "dport" else f.sport
        e = z3.Or([z3.And(lo <= field, field <= hi) for lo, hi in c.arg])
    elif c.kind == "icmp":
        e = f.icmp == c.arg
    elif c.kind == "state":
        e = z3.Or([f.state == STATES.index(s) for s in c.arg])
    else:
        op, hop = c.arg
        e = f.hl == hop if op == "eq" else f.hl < hop if op == "lt" else f.hl > hop
    return z3.Not(e) if c.negate else e


def accepts(table: Table, sets: dict[str, IpSetDef], hook: str, f: Fields) -> Any:
    """Whether netfilter accepts the symbolic packet in `hook`, as one formula (calls inlined)."""

    def run(chain: str, i: int, on_return: Any) -> Any:
        rules = table.rules[chain]
        if i == len(rules):
            return on_return
        r = rules[i]
        rest = run(chain, i + 1, on_return)
        if r.target == "ACCEPT":
            taken = z3.BoolVal(True)
        elif r.target in ("DROP", "REJECT"):
            taken = z3.BoolVal(False)
        elif r.target == "LOG":
            taken = rest
        elif r.target == "RETURN":
            taken = on_return
        elif r.goto:
            taken = run(r.target, 0, on_return)
        else:
            taken = run(r.target, 0, rest)
        matched = z3.And([condition(c, f, table, sets) for c in r.conds]) if r.conds else z3.BoolVal(True)
        return z3.If(matched, taken, rest)

    return run(hook, 0, z3.BoolVal(table.policies[hook] == "ACCEPT"))


@pytest.mark.parametrize("host", ["mysql-1", "haproxy-www-1"])
def test_verifier_and_z3_agree_on_mutated_files(host: str) -> None:
    plan = build_plan(load_stack("prod"))
    files = plan.files[host]
    original = with_push_jumps(parse_tables(files.ipv4, 4, "rules.v4"))
    original_sets = parse_ipsets(files.ipsets, "ipsets")
    rng = random.Random(23)
    seen = {"equal": 0, "different": 0}
    for _ in range(MUTATIONS):
        v4, ipsets = mutate(rng, files.ipv4, files.ipsets)
        proof = Prover(plan.policy, plan.addresses).prove(dataclasses.replace(HostText.of(files), rules_v4=v4, ipsets=ipsets))
        mutated = with_push_jumps(parse_tables(v4, 4, "rules.v4"))
        sets = parse_ipsets(ipsets, "ipsets")
        f = Fields()
        solver = z3.Solver()
        solver.add(f.domain())
        solver.add(z3.Or([accepts(original, original_sets, hook, f) != accepts(mutated, sets, hook, f)
                          for hook in ("INPUT", "OUTPUT")]))
        differs = solver.check() == z3.sat
        v4_differences = [d for d in proof.differences if d.family == 4]
        assert differs == bool(v4_differences), (v4, solver.model() if differs else None)
        seen["different" if differs else "equal"] += 1
    assert seen["equal"] and seen["different"]
