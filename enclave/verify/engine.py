"""Netfilter's filter-table traversal over classes of packets ("atoms"), and the exact comparison with an intent.

Exactness: every dimension of a packet (interface, source, destination, protocol, ports, ICMP type, conntrack
state, hop limit) is cut at every boundary that any rule, any set or the intent draws. Within one class no rule
and no intent tells two packets apart, so evaluating one representative per combination of classes decides every
packet: "equal on every atom" is "equal for every packet".

Pure logic: no I/O, no root.
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Iterator, Protocol

from .parse import PROTOCOL_NAMES, STATES, TERMINAL, Cond, IpSetDef, Rule, Table

OTHER_PROTOCOL = 47  # gre: a protocol no enclave rule names
Regions = dict[object, list[tuple[int, int]]]


class VerifyError(ValueError):
    """Input that parses but cannot be proved (a set the rules use is missing, a set of the wrong family)."""


@dataclass(frozen=True)
class Packet:
    iface: str
    src: int  # an address (the representative of its class)
    dst: int
    proto: int
    sport: int
    dport: int
    icmp: int  # -1 when not ICMP
    state: str
    hl: int
    src_keys: frozenset[object]
    dst_keys: frozenset[object]

    def describe(self, family: int, hook: str, names: dict[int, str] | None = None) -> str:
        def addr(a: int) -> str:
            text = str(ipaddress.ip_address(a) if family == 4 else ipaddress.IPv6Address(a))
            return f"{text} ({names[a]})" if names and a in names else text

        where = f"{'in' if hook == 'INPUT' else 'out'} {self.iface}"
        what = PROTOCOL_NAMES.get(self.proto, f"proto {self.proto}")
        if self.proto in (6, 17):
            what += f"/{self.dport}" + (f" sport {self.sport}" if self.sport else "")
        elif self.icmp >= 0:
            what += f" type {self.icmp}"
        hl = f" hl {self.hl}" if family == 6 else ""
        return f"{where} {addr(self.src)} -> {addr(self.dst)} {what} {self.state}{hl}"


class Intent(Protocol):
    """What a host should do (enclave.verify.spec): the boundaries it draws, and its verdict on a packet."""

    def src_regions(self, family: int, hook: str) -> Regions: ...
    def dst_regions(self, family: int, hook: str) -> Regions: ...
    def interfaces(self) -> list[str]: ...
    def ports(self, hook: str) -> list[tuple[int, int]]: ...
    def icmp_types(self, family: int) -> list[int]: ...
    def hop_limits(self, family: int) -> list[int]: ...
    def preferred(self, family: int, hook: str, side: str) -> list[int]: ...
    def verdict(self, family: int, hook: str, p: Packet) -> tuple[bool, str]: ...
    def name_of(self, family: int, addr: int) -> str | None: ...


# ------------------------------------------------------------------------------------------ traversal


def with_push_jumps(table: Table) -> Table:
    """A rendered file as the push loads it: INPUT/OUTPUT jump to enclave's chains (after other tools' jumps).

    Live `*-save` output is taken as it is: a missing or misplaced jump there is a finding, not a formality.
    """
    if table.live:
        return table
    rules = dict(table.rules)
    for hook in ("INPUT", "OUTPUT"):
        chain = f"ENCLAVE-{hook}"
        if chain not in rules or any(r.target == chain for r in rules[hook]):
            continue
        at = 0
        for k, r in enumerate(rules[hook]):
            if r.target in table.rules and not r.target.startswith("ENCLAVE-"):
                at = k + 1
        jump = Rule(hook, 0, f"-A {hook} -j {chain} (the jump the push places)", (), chain)
        rules[hook] = rules[hook][:at] + [jump] + rules[hook][at:]
    return Table(table.family, table.source, table.policies, table.policy_lines, rules, table.live)


def _iface_match(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def matches(conds: tuple[Cond, ...], p: Packet) -> bool:
    for c in conds:
        k = c.kind
        if k == "iface_in" or k == "iface_out":
            hit = _iface_match(str(c.arg), p.iface)
        elif k == "src":
            hit = _key(c) in p.src_keys
        elif k == "dst":
            hit = _key(c) in p.dst_keys
        elif k == "proto":
            hit = p.proto == c.arg
        elif k == "dport" or k == "sport":
            port = p.dport if k == "dport" else p.sport
            hit = any(lo <= port <= hi for lo, hi in c.arg)
        elif k == "icmp":
            hit = p.icmp == c.arg
        elif k == "state":
            hit = p.state in c.arg
        elif k == "hl":
            op, v = c.arg
            hit = p.hl == v if op == "eq" else p.hl < v if op == "lt" else p.hl > v
        else:  # pragma: no cover - parse refuses every other kind
            raise AssertionError(k)
        if hit == c.negate:
            return False
    return True


def _key(c: Cond) -> object:
    what, kind = c.arg
    return ("set", what) if kind == "set" else ("net", what)


def traverse(table: Table, hook: str, p: Packet) -> tuple[str, Rule | None]:
    """The verdict netfilter gives `p` in `hook`, and the rule that decided it (None: the chain's policy)."""
    stack: list[tuple[str, int]] = []
    chain, i = hook, 0
    policy = table.policies[hook] or "ACCEPT"
    while True:
        rules = table.rules[chain]
        if i >= len(rules):
            if table.policies[chain] is not None or not stack:
                return policy, None
            chain, i = stack.pop()
            continue
        r = rules[i]
        i += 1
        if not matches(r.conds, p):
            continue
        if r.target in TERMINAL:
            return r.target, r
        if r.target == "LOG":
            continue
        if r.target == "RETURN":
            if table.policies[chain] is not None or not stack:
                return policy, r
            chain, i = stack.pop()
            continue
        if not r.goto:
            stack.append((chain, i))
        chain, i = r.target, 0


# ---------------------------------------------------------------------------------------------- atoms


@dataclass
class Partition:
    """Addresses cut into classes no region tells apart: sorted boundaries, each interval's class."""

    starts: list[int]
    class_of: list[int]
    keys: list[frozenset[object]]
    reps: list[int]

    def lookup(self, addr: int) -> int:
        return self.class_of[bisect.bisect_right(self.starts, addr) - 1]


def partition(regions: Regions, preferred: list[int]) -> Partition:
    events: dict[int, list[tuple[object, int]]] = {0: []}
    for key, intervals in regions.items():
        for lo, hi in intervals:
            events.setdefault(lo, []).append((key, 1))
            events.setdefault(hi, []).append((key, -1))
    active: dict[object, int] = {}
    starts: list[int] = []
    class_of: list[int] = []
    index: dict[frozenset[object], int] = {}
    keys: list[frozenset[object]] = []
    reps: list[int] = []
    current: frozenset[object] = frozenset()
    for at in sorted(events):
        for key, delta in events[at]:
            count = active.get(key, 0) + delta
            if count:
                active[key] = count
            else:
                active.pop(key, None)
        current = frozenset(active)
        if current not in index:
            index[current] = len(keys)
            keys.append(current)
            reps.append(at)
        if class_of and class_of[-1] == index[current]:
            continue
        starts.append(at)
        class_of.append(index[current])
    part = Partition(starts, class_of, keys, reps)
    for addr in reversed(preferred):  # a stack's own addresses read better in a counterexample than 0.0.0.0
        part.reps[part.lookup(addr)] = addr
    return part


def _cuts(points: set[int], top: int) -> list[int]:
    """Representatives (the low end) of the intervals [0, top) cut at `points`."""
    return sorted({0} | {x for x in points if 0 < x < top})


@dataclass(frozen=True)
class Difference:
    family: int
    hook: str
    packet: Packet
    rules_accept: bool
    rule: Rule | None
    policy_line: int
    intent_accept: bool
    reason: str
    names: dict[int, str]  # stack hosts among the packet's addresses
    # every conntrack state for which this same packet differs in the same way (the packet shows the first)
    states: tuple[str, ...] = ()

    def packet_text(self) -> str:
        text = self.packet.describe(self.family, self.hook, self.names)
        if len(self.states) > 1:
            text = text.replace(f" {self.packet.state}", " " + "|".join(self.states), 1)
        return text

    def describe(self) -> str:
        got = "ACCEPT" if self.rules_accept else "DROP"
        want = "allow" if self.intent_accept else "deny"
        if self.rule is not None:
            decided = f"line {self.rule.line}: {self.rule.text}" if self.rule.line else self.rule.text
        else:
            decided = f"the {self.hook} policy (line {self.policy_line})"
        return (f"IPv{self.family} {self.packet_text()}: rules {got} by {decided}; "
                f"policy says {want} ({self.reason})")


def packets(table: Table, hook: str, intent: Intent, sets: dict[str, IpSetDef]) -> Iterator[Packet]:
    """One representative packet per atom of `hook` in this table and intent."""
    family = table.family
    src_regions, dst_regions = dict(intent.src_regions(family, hook)), dict(intent.dst_regions(family, hook))
    ifaces = set(intent.interfaces()) | {"lo"}
    prefixes: set[str] = set()
    protos = {6, 17, 1 if family == 4 else 58, OTHER_PROTOCOL}
    port_points: set[int] = set()
    for lo, hi in intent.ports(hook):
        port_points |= {lo, hi + 1}
    sport_points: set[int] = set()
    icmp = set(intent.icmp_types(family))
    hl_points = set()
    for v in intent.hop_limits(family):
        hl_points |= {v, v + 1}
    rule_src, rule_dst = table_regions(table, sets)
    src_regions.update(rule_src)
    dst_regions.update(rule_dst)
    for rules in table.rules.values():
        for r in rules:
            for c in r.conds:
                if c.kind in ("iface_in", "iface_out"):
                    name = str(c.arg)
                    (prefixes if name.endswith("+") else ifaces).add(name.rstrip("+") if name.endswith("+") else name)
                elif c.kind == "proto":
                    protos.add(int(c.arg))
                elif c.kind in ("dport", "sport"):
                    for lo, hi in c.arg:
                        (port_points if c.kind == "dport" else sport_points).update((lo, hi + 1))
                elif c.kind == "icmp":
                    icmp.add(int(c.arg))
                elif c.kind == "hl":
                    op, v = c.arg
                    hl_points |= {v, v + 1}
    # A name no rule spells but one that starts with each prefix, and one that starts with none.
    iface_reps = sorted(ifaces) + [p + "~" for p in sorted(prefixes)] + ["~other"]
    icmp_reps = sorted(icmp) + [next(t for t in range(256) if t not in icmp)]
    srcs = partition(src_regions, intent.preferred(family, hook, "src"))
    dsts = partition(dst_regions, intent.preferred(family, hook, "dst"))
    dports = _cuts(port_points, 65536)
    sports = _cuts(sport_points, 65536)
    hls = _cuts(hl_points, 256)
    for iface in iface_reps:
        for s in range(len(srcs.keys)):
            for d in range(len(dsts.keys)):
                for proto in sorted(protos):
                    if proto in (6, 17):
                        shapes = [(sp, dp, -1) for sp in sports for dp in dports]
                    elif proto == (1 if family == 4 else 58):
                        shapes = [(0, 0, t) for t in icmp_reps]
                    else:
                        shapes = [(0, 0, -1)]
                    for sp, dp, t in shapes:
                        for state in STATES:
                            for hl in hls:
                                yield Packet(iface, srcs.reps[s], dsts.reps[d], proto, sp, dp, t, state, hl,
                                             srcs.keys[s], dsts.keys[d])


def table_regions(table: Table, sets: dict[str, IpSetDef]) -> tuple[Regions, Regions]:
    """The address regions the rules test, as sources and as destinations, keyed as `matches` looks them up."""
    src: Regions = {}
    dst: Regions = {}
    for rules in table.rules.values():
        for r in rules:
            for c in r.conds:
                if c.kind in ("src", "dst"):
                    what, kind = c.arg
                    if kind == "set":
                        intervals = list(resolve_set(sets, str(what), table.family, table).members)
                    else:
                        intervals = [what]
                    (src if c.kind == "src" else dst)[_key(c)] = intervals
    return src, dst


def keys_at(regions: Regions, addr: int) -> frozenset[object]:
    return frozenset(k for k, intervals in regions.items() if any(lo <= addr < hi for lo, hi in intervals))


def _refuse_wrong_direction(table: Table, hook: str) -> None:
    """`-o` in a chain INPUT reaches, `-i` in one OUTPUT reaches: the kernel refuses to load them. A forwarding
    match (conntrack's DNAT state, original destination port) in one they reach is not modelled: refused."""
    wrong = "iface_out" if hook == "INPUT" else "iface_in"
    seen: set[str] = set()
    todo = [hook]
    while todo:
        chain = todo.pop()
        if chain in seen:
            continue
        seen.add(chain)
        for r in table.rules[chain]:
            if any(c.kind == wrong for c in r.conds):
                raise VerifyError(f"{table.source}:{r.line}: {'-o' if hook == 'INPUT' else '-i'} in a chain {hook} "
                                  f"reaches ({chain}); iptables refuses it: {r.text}")
            if any(c.kind in ("nat", "origdport") for c in r.conds):
                raise VerifyError(f"{table.source}:{r.line}: a forwarding match (--ctstate DNAT/SNAT, --ctorigdstport) "
                                  f"in a chain {hook} reaches ({chain}) is not modelled: {r.text}")
            if r.target in table.rules:
                todo.append(r.target)


def resolve_set(sets: dict[str, IpSetDef], name: str, family: int, table: Table) -> IpSetDef:
    """The set a rule's `--match-set NAME` matches (rendered files name sets as they land: `enclave-x.k3x`)."""
    s = sets.get(name)
    if s is None:
        raise VerifyError(f"{table.source}: the rules match set {name!r}, which the ipsets file does not create")
    if s.family != family:
        raise VerifyError(f"{table.source}: set {name!r} is IPv{s.family} but matched in an IPv{family} table")
    return s


def compare(table: Table, hook: str, intent: Intent, sets: dict[str, IpSetDef],
            limit: int = 20) -> tuple[int, int, list[Difference]]:
    """(atoms evaluated, atoms where the rules and the intent disagree, the first `limit` of those)."""
    table = with_push_jumps(table)
    _refuse_wrong_direction(table, hook)
    found: list[Difference] = []
    # one counterexample per packet and reason, listing the states it holds for (NEW and UNTRACKED go together)
    same: dict[tuple[object, ...], int] = {}
    count = wrong = 0
    policy_line = table.policy_lines.get(hook, 0)
    for p in packets(table, hook, intent, sets):
        count += 1
        verdict, rule = traverse(table, hook, p)
        accept = verdict == "ACCEPT"
        want, why = intent.verdict(table.family, hook, p)
        if accept != want:
            wrong += 1
            key = (p.iface, p.src, p.dst, p.proto, p.sport, p.dport, p.icmp, p.hl, rule, why)
            if key in same:
                d = found[same[key]]
                found[same[key]] = dataclasses.replace(d, states=d.states + (p.state,))
            elif len(found) < limit:
                names = {a: n for a in (p.src, p.dst) if (n := intent.name_of(table.family, a)) is not None}
                same[key] = len(found)
                found.append(Difference(table.family, hook, p, accept, rule, policy_line, want, why, names, (p.state,)))
    return count, wrong, found
