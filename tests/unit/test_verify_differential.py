"""Differential test: the verifier against a brute-force evaluator of concrete packets on mutated rule files.

The brute force shares nothing with the verifier's atoms: it walks the chains for one concrete packet, testing
addresses against networks and set members directly. On every mutated file: when the verifier proves the files
equal to the policy, no sampled packet may tell them apart; when it gives counterexamples, each must be a
packet on which the brute force and the policy really disagree.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import re
from typing import Any

import pytest

from config.stackfile import load_stack
from enclave.plan import Plan, build_plan
from enclave.verify.engine import Packet, resolve_set, with_push_jumps
from enclave.verify.parse import STATES, IpSetDef, Table, parse_ipsets, parse_tables
from enclave.verify.prove import HostText, Prover
from enclave.verify.spec import HostIntent

MUTATIONS = 60
PACKETS = 400


def brute_verdict(table: Table, sets: dict[str, IpSetDef], hook: str, p: Packet) -> bool:
    def inside(arg: tuple[Any, str], addr: int) -> bool:
        what, kind = arg
        if kind == "net":
            low: int = what[0]
            high: int = what[1]
            return low <= addr < high
        members = resolve_set(sets, str(what), table.family, table).members
        return any(lo <= addr < hi for lo, hi in members)

    def hit(kind: str, arg: Any) -> bool:
        if kind in ("iface_in", "iface_out"):
            name = str(arg)
            return p.iface.startswith(name[:-1]) if name.endswith("+") else p.iface == name
        if kind in ("src", "dst"):
            return inside(arg, p.src if kind == "src" else p.dst)
        if kind == "proto":
            return bool(p.proto == arg)
        if kind in ("dport", "sport"):
            port = p.dport if kind == "dport" else p.sport
            return any(lo <= port <= hi for lo, hi in arg)
        if kind == "icmp":
            return bool(p.icmp == arg)
        if kind == "state":
            return p.state in arg
        op: str = arg[0]
        hop: int = arg[1]
        return {"eq": p.hl == hop, "lt": p.hl < hop, "gt": p.hl > hop}[op]

    def run(chain: str) -> str | None:  # a verdict, "RETURN", or None (fell off the end)
        for r in table.rules[chain]:
            if not all(hit(c.kind, c.arg) != c.negate for c in r.conds):
                continue
            if r.target in ("ACCEPT", "DROP", "REJECT", "RETURN"):
                return r.target
            if r.target == "LOG":
                continue
            inner = run(r.target)
            if inner in ("ACCEPT", "DROP", "REJECT"):
                return inner
            if r.goto:
                return "RETURN"
        return None

    outcome = run(hook)
    if outcome in ("ACCEPT", "DROP", "REJECT"):
        return outcome == "ACCEPT"
    return table.policies[hook] == "ACCEPT"


def mutate(rng: random.Random, v4: str, ipsets: str) -> tuple[str, str]:
    lines = v4.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("-A ")]
    i = rng.choice(rules)
    kind = rng.randrange(9)
    line = lines[i]
    if kind == 0:
        line = re.sub(r"--dport (\d+)", lambda m: f"--dport {int(m.group(1)) + rng.choice((-1, 1, 1000))}", line)
    elif kind == 1:
        line = re.sub(r"-i \S+ ", "", line)
    elif kind == 2:
        line = line.replace("-i eth1", "-i eth0") if "eth1" in line else line.replace("-i eth0", "-i eth+")
    elif kind == 3:
        names = sorted(set(re.findall(r"--match-set (\S+)", v4)))
        if names:
            line = re.sub(r"--match-set \S+", f"--match-set {rng.choice(names)}", line)
    elif kind == 4:
        created = re.findall(r"^create (\S+)", ipsets, re.M)
        ipsets += f"add {rng.choice(created)} 10.110.16.{rng.randrange(256)}\n"
    elif kind == 5:
        line = line.replace("RELATED,ESTABLISHED", rng.choice(("RELATED,ESTABLISHED,NEW", "ESTABLISHED", "RELATED,ESTABLISHED,UNTRACKED")))
    elif kind == 6:
        # a foreign rule: an accept of some port (a finding) or a drop of one (harmless after the accepts)
        target = rng.choice(("ACCEPT", "DROP"))
        lines.insert(i, f"-A ENCLAVE-INPUT -p {rng.choice(('tcp', 'udp'))} -m multiport --dports "
                        f"{rng.randrange(1, 5000)}:{rng.randrange(5000, 9000)},{rng.randrange(9000, 65536)} -j {target}")
    elif kind == 7:
        line = line.replace("-j ACCEPT", "-j DROP") if "ACCEPT" in line else line.replace("-j DROP", "-j RETURN")
    else:
        line = line.replace(" -s ", " ! -s ").replace("-m set --match-set", "-m set ! --match-set")
    lines[i] = line
    return "\n".join(lines) + "\n", ipsets


def random_packet(rng: random.Random, plan: Plan, family: int, hook: str, named: list[int]) -> Packet:
    if family == 4:
        pool = [int(ipaddress.ip_address(a.private)) for a in plan.addresses.values()]
        pool += [int(ipaddress.ip_address(x)) for x in ("192.0.2.10", "198.51.100.7", "10.110.16.250")]
    else:
        pool = [int(ipaddress.ip_address(x)) for x in ("fe80::1", "2001:db8:ff::10", "2001:db8:e0::13")]

    def addr() -> int:
        near = rng.choice(pool) + (rng.choice((0, 0, 0, 1, -1)) if family == 4 else 0)
        return near if rng.random() < 0.9 else rng.randrange(1 << (32 if family == 4 else 128))

    proto = rng.choice((6, 6, 17, 1 if family == 4 else 58, 47))
    ports = (22, 80, 3306, 3307, 24007, 24008, 49152, 49251, 8080, *named)
    dport = rng.choice(ports) + rng.choice((0, 0, 1, -1)) if rng.random() < 0.8 else rng.randrange(65536)
    icmp = rng.choice((8, 0, 128, 130, 134, 135, 136, 3)) if proto in (1, 58) else -1
    return Packet(rng.choice(("lo", "eth0", "eth1", "eth2")), addr(), addr(), proto, rng.randrange(65536),
                  dport if proto in (6, 17) else 0, icmp, rng.choice(STATES), rng.choice((1, 64, 255)),
                  frozenset(), frozenset())


@pytest.mark.parametrize("host", ["mysql-1", "haproxy-www-1"])
def test_verifier_and_brute_force_never_disagree(host: str) -> None:
    plan = build_plan(load_stack("prod"))
    files = plan.files[host]
    intent = HostIntent(plan.policy, plan.addresses, plan.policy.host_by_name[host])
    rng = random.Random(18)
    outcomes = {"proved": 0, "refuted": 0}
    for _ in range(MUTATIONS):
        v4, ipsets = mutate(rng, files.ipv4, files.ipsets)
        text = dataclasses.replace(HostText.of(files), rules_v4=v4, ipsets=ipsets)
        proof = Prover(plan.policy, plan.addresses, limit=1000).prove(text)
        sets = parse_ipsets(ipsets, "ipsets")
        table = with_push_jumps(parse_tables(v4, 4, "rules.v4"))
        for d in proof.differences:  # every counterexample is real
            if d.family == 4:
                assert brute_verdict(table, sets, d.hook, d.packet) == d.rules_accept != d.intent_accept, d.describe()
        # the ports the mutated file names, and their ends: where a wrong boundary would show
        named = [int(x) + d for x in re.findall(r"(?<=[ ,:])(\d+)(?=[ ,:])", v4) for d in (0, 1) if int(x) < 65535]
        if proof.proved:
            for _ in range(PACKETS):  # nothing the sample finds may contradict a proof
                hook = rng.choice(("INPUT", "OUTPUT"))
                p = random_packet(rng, plan, 4, hook, named)
                assert brute_verdict(table, sets, hook, p) == intent.verdict(4, hook, p)[0], (v4, p)
        outcomes["proved" if proof.proved else "refuted"] += 1
    assert outcomes["proved"] and outcomes["refuted"]  # the mutations exercise both answers
