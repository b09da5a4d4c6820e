"""The stack's tests proved for every packet: each test against the rule files its destination hosts receive.

`enclave.plan.evaluate_tests` judges a test with decide() over stand-in sources (one outsider, one operator
address); the lab sends a sample of real packets. This proves it: the packets a test names are cut into classes
no rule tells apart (as enclave.verify.engine does) and netfilter's traversal decides each class. Every packet is
a NEW connection, from every source port, to every destination port of the test, to the destination's address on
the interface the source arrives on:

  role or host   its hosts' private addresses on the private interface (IPv4; a destination host itself is
                 left out: it reaches itself over loopback, which is always open)
  operators      every address of `operators`, on the public interface (IPv4 and IPv6)
  internet       the plan's stand-in outsider (one IPv4 and one IPv6 address) on the public interface
  outside        every address outside vpcIpRange and `operators` on the public interface (IPv4 and IPv6)
  neighbor       every address of vpcIpRange that is no stack host's, on the private interface

`allow` holds when the rules accept every such packet, `deny` when they accept none; otherwise the test sees
`mixed`, and a packet that contradicts the expectation is the counterexample.

Pure logic: no I/O, no root.
"""

from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass, replace

from config.schema import PolicyTest, PortSpec

from ..compiler import Addresses, Host, Policy
from ..plan import TestResult, is_outside, outside_address, outsiders
from ..rulefiles import RuleFiles
from .engine import Packet, Regions, keys_at, partition, table_regions, traverse, with_push_jumps
from .parse import IpSetDef, Table, parse_ipsets, parse_tables
from .prove import COMMENT_LINE

TEST_REGION = ("the test's sources",)
ECHO = {4: 8, 6: 128}
ICMP_PROTO = {4: 1, 6: 58}
TOP = {4: 1 << 32, 6: 1 << 128}
Interval = tuple[int, int]


@dataclass(frozen=True)
class TestProof:
    index: int
    test: PolicyTest
    seen: str  # allow | deny | mixed, over every packet the test names
    classes: int  # classes of packets evaluated (each stands for every packet no rule tells apart from it)
    counterexample: str  # a packet that contradicts the expectation and the rule line that decided it, or ""

    @property
    def passed(self) -> bool:
        return self.seen == self.test.expect

    def describe(self) -> str:
        return TestResult(self.index, self.test, self.seen, "").describe()


@dataclass
class _Files:
    tables: dict[int, Table]
    sets: dict[str, IpSetDef]
    src_regions: dict[int, Regions]
    dst_regions: dict[int, Regions]
    dport_cuts: dict[int, set[int]]
    sport_cuts: dict[int, list[int]]


def _addr(family: int, text: str) -> int:
    return int(ipaddress.IPv4Address(text) if family == 4 else ipaddress.IPv6Address(text))


def _complement(intervals: list[Interval], top: int) -> list[Interval]:
    out, at = [], 0
    for lo, hi in sorted(intervals):
        if lo > at:
            out.append((at, lo))
        at = max(at, hi)
    if at < top:
        out.append((at, top))
    return out


def _merged(intervals: tuple[Interval, ...]) -> tuple[Interval, ...]:
    """Sorted and disjoint (operators' networks may overlap)."""
    out: list[Interval] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _interval(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Interval:
    return int(net.network_address), int(net.broadcast_address) + 1


class TestProver:
    """Proves the stack's tests over the rendered files (or any files given per host); hosts with the same files
    are parsed once and every (files, source region, port) is decided once."""

    def __init__(self, policy: Policy, addresses: dict[str, Addresses], files: dict[str, RuleFiles]) -> None:
        self.policy, self.addresses, self.files = policy, addresses, files
        self.others = outsiders(policy.stack, addresses)
        self._parsed: list[_Files] = []
        self._buckets: dict[tuple[object, ...], list[tuple[str, int]]] = {}
        self._host_files: dict[str, int] = {}
        self._decided: dict[tuple[object, ...], tuple[int, int, int, Packet | None, str]] = {}
        self.names: dict[int, str] = {}
        for name, a in addresses.items():
            for family, text in ((4, a.private), (4, a.public), (6, a.public6)):
                if text:
                    self.names[_addr(family, text)] = name
        self.private = {name: _addr(4, a.private) for name, a in addresses.items()}
        self._sources: dict[tuple[str, str | None], list[tuple[str, int, tuple[Interval, ...]]]] = {}

    def _files_of(self, host: str) -> int:
        """The number of the host's distinct file set. As enclave.verify.prove does, set files (the large part)
        are bucketed by length and ends and compared whole: hashing 10 000 hosts' set files costs more than
        the proofs."""
        if host in self._host_files:
            return self._host_files[host]
        f = self.files[host]
        bucket = (COMMENT_LINE.sub("", f.ipv4), COMMENT_LINE.sub("", f.ipv6), len(f.ipsets), f.ipsets[:256],
                  f.ipsets[-256:])
        known = self._buckets.setdefault(bucket, [])
        number = next((n for ipsets, n in known if ipsets == f.ipsets), None)
        if number is None:
            number = len(self._parsed)
            self._parsed.append(self._parse(host))
            known.append((f.ipsets, number))
        self._host_files[host] = number
        return number

    def _parse(self, host: str) -> _Files:
        f = self.files[host]
        sets = parse_ipsets(f.ipsets, f"{host}/ipsets")
        tables = {4: with_push_jumps(parse_tables(f.ipv4, 4, f"{host}/rules.v4")),
                  6: with_push_jumps(parse_tables(f.ipv6, 6, f"{host}/rules.v6"))}
        parsed = _Files(tables, sets, {}, {}, {}, {})
        for family, table in tables.items():
            parsed.src_regions[family], parsed.dst_regions[family] = table_regions(table, sets)
            dports: set[int] = set()
            sports: set[int] = {0}
            for rules in table.rules.values():
                for r in rules:
                    for c in r.conds:
                        if c.kind in ("dport", "sport"):
                            for lo, hi in c.arg:
                                (dports if c.kind == "dport" else sports).update((lo, hi + 1))
            parsed.dport_cuts[family] = dports
            parsed.sport_cuts[family] = sorted(x for x in sports if x < 65536)
        return parsed

    # --- what a test names -----------------------------------------------------------------------

    def sources(self, name: str, dst: Host) -> list[tuple[str, int, tuple[Interval, ...]]]:
        """(interface, family, address intervals) of the packets a test's `from` names, towards `dst`; the
        same object for every destination the source does not include (so it is decided once)."""
        key = self._source_key(name, dst)
        if key not in self._sources:
            self._sources[key] = [(i, f, _merged(r)) for i, f, r in self._regions(name, dst)]
        return self._sources[key]

    @staticmethod
    def _source_key(name: str, dst: Host) -> tuple[str, str | None]:
        """A test's `from`, and the destination when the source names it (it is left out of its own sources)."""
        return name, dst.name if name in (dst.role, dst.name) else None

    def _regions(self, name: str, dst: Host) -> list[tuple[str, int, tuple[Interval, ...]]]:
        stack = self.policy.stack
        ops = {v: [_interval(n) for n in stack.operators if n.version == v] for v in (4, 6)}
        if name == "operators":
            return [("public", v, tuple(ops[v])) for v in (4, 6) if ops[v]]
        if name == "internet":
            ends = ((4, self.others.internet.address), (6, self.others.internet.address6))
            return [("public", v, ((a, a + 1),)) for v, text in ends if text for a in [_addr(v, text)]]
        if name == "outside":
            vpc = _interval(stack.vpc_ip_range)
            return [("public", 4, tuple(_complement([vpc, *ops[4]], TOP[4]))),
                    ("public", 6, tuple(_complement(ops[6], TOP[6])))]
        hosts = sorted(self.private.values())
        if name == "neighbor":
            vpc = _interval(stack.vpc_ip_range)
            inside = _complement([vpc], TOP[4])
            return [("private", 4, tuple(_complement(inside + [(a, a + 1) for a in hosts], TOP[4])))]
        named = sorted(self.private[h.name] for h in self.policy.hosts_of(name) if h != dst)
        return [("private", 4, tuple((a, a + 1) for a in named))]

    # --- the proof ---------------------------------------------------------------------------------

    def prove(self, index: int, test: PolicyTest) -> TestProof:
        if is_outside(test.to):
            return self._prove_egress(index, test)
        accepted = dropped = classes = 0
        counterexample = ""
        for dst in self.policy.hosts_of(test.to):
            files_key = self._files_of(dst.name)
            parsed = self._parsed[files_key]
            mine = self.addresses[dst.name]
            regions = self.sources(test.sources, dst)
            source_key = self._source_key(test.sources, dst)
            for interface, family, region in regions:
                target = mine.private if interface == "private" else mine.public if family == 4 else mine.public6
                if target is None or not region:
                    continue  # no IPv6 address: no such packet reaches the host
                dst_addr = self.private[dst.name] if interface == "private" else _addr(family, target)
                dst_keys = keys_at(parsed.dst_regions[family], dst_addr)
                for spec in test.ports:
                    key = (files_key, interface, family, dst_keys, source_key, spec)
                    if key not in self._decided:
                        self._decided[key] = self._decide(parsed, dst, interface, family, region, spec, test.expect,
                                                          dst_addr, dst_keys)
                    n, acc, drop, packet, rule = self._decided[key]
                    classes, accepted, dropped = classes + n, accepted + acc, dropped + drop
                    if packet is not None and not counterexample:
                        packet = replace(packet, dst=dst_addr)
                        names = {a: self.names[a] for a in (packet.src, packet.dst) if a in self.names}
                        counterexample = (f"IPv{family} {packet.describe(family, 'INPUT', names)} "
                                          f"({dst.name} {rule})")
        return TestProof(index, test, TestResult.verdict(accepted, dropped), classes, counterexample)

    def _prove_egress(self, index: int, test: PolicyTest) -> TestProof:
        """A test to `internet` or a CIDR: each source host's OUTPUT rules judge a new connection to the address
        the test is probed at (the plan's, enclave.plan.outside_address) on its one port, leaving the way the
        droplet's Internet traffic leaves (its public interface; a private droplet's one interface, through the
        NAT gateway). The verifier proves every other egress packet with the host (enclave.verify.spec)."""
        stack = self.policy.stack
        (port,) = test.ports  # the schema gives a test to internet or a CIDR one port
        dst_addr = _addr(4, outside_address(test.to, self.others))
        proto = {"tcp": 6, "udp": 17}.get(port.proto, 1)
        accepted = dropped = 0
        counterexample = ""
        for src in self.policy.hosts_of(test.sources):
            parsed = self._parsed[self._files_of(src.name)]
            public = stack.public_interface(src.role)
            iface = public if public is not None else stack.private_interface(src.role)
            text = self.addresses[src.name].public if public is not None else self.addresses[src.name].private
            assert text is not None
            src_addr = _addr(4, text)
            packet = Packet(iface, src_addr, dst_addr, proto, 40000 if proto != 1 else 0, port.low if proto != 1 else 0,
                            8 if proto == 1 else -1, "NEW", 64, keys_at(parsed.src_regions[4], src_addr),
                            keys_at(parsed.dst_regions[4], dst_addr))
            verdict, rule = traverse(parsed.tables[4], "OUTPUT", packet)
            admitted = verdict == "ACCEPT"
            accepted, dropped = accepted + admitted, dropped + (not admitted)
            if admitted != (test.expect == "allow") and not counterexample:
                how = f"line {rule.line}: {rule.text}" if rule is not None else "the OUTPUT policy"
                counterexample = (f"IPv4 {packet.describe(4, 'OUTPUT', self.names)} ({src.name} "
                                  f"{'accepts' if admitted else 'drops'} it: {how})")
        return TestProof(index, test, TestResult.verdict(accepted, dropped), accepted + dropped, counterexample)

    def _decide(self, parsed: _Files, dst: Host, interface: str, family: int, region: tuple[Interval, ...], spec: PortSpec,
                expect: str, dst_addr: int, dst_keys: frozenset[object]
                ) -> tuple[int, int, int, Packet | None, str]:
        """(classes, accepted, dropped, the first packet contradicting `expect`, what the rules did with it)."""
        table = parsed.tables[family]
        stack = self.policy.stack  # a role with `public: false` has one interface, named interfaces.privateOnly
        iface = stack.private_interface(dst.role) if interface == "private" else stack.public_interface(dst.role)
        assert iface is not None, "a packet on the public side of a host without one"  # the caller skips those
        regions = dict(parsed.src_regions[family])
        regions[TEST_REGION] = list(region)
        # a counterexample reads best from the plan's outsider, then from stack hosts' addresses
        outsider = self.others.internet.address if family == 4 else self.others.internet.address6
        candidates = ([_addr(family, outsider)] if outsider else []) + sorted(self.names)
        starts = [lo for lo, _ in region]  # sorted, disjoint
        preferred = [a for a in candidates if (i := bisect.bisect_right(starts, a) - 1) >= 0 and a < region[i][1]]
        part = partition(regions, preferred)
        if spec.proto == "icmp":
            shapes = [(ICMP_PROTO[family], 0, 0, ECHO[family])]
        else:
            proto = 6 if spec.proto == "tcp" else 17
            cuts = sorted({spec.low} | {c for c in parsed.dport_cuts[family] if spec.low < c <= spec.high})
            shapes = [(proto, sp, dp, -1) for dp in cuts for sp in parsed.sport_cuts[family]]
        n = accepted = dropped = 0
        found: Packet | None = None
        decided_by = ""
        for k, keys in enumerate(part.keys):
            if TEST_REGION not in keys:
                continue
            for proto, sport, dport, icmp in shapes:
                packet = Packet(iface, part.reps[k], dst_addr, proto, sport, dport, icmp, "NEW", 64, keys, dst_keys)
                verdict, rule = traverse(table, "INPUT", packet)
                n += 1
                ok = verdict == "ACCEPT"
                accepted, dropped = accepted + ok, dropped + (not ok)
                if found is None and ok != (expect == "allow"):
                    found = packet
                    decided_by = ("accepts" if ok else "drops") + " it: " + (
                        f"line {rule.line}: {rule.text}" if rule and rule.line else rule.text if rule
                        else f"the INPUT policy {table.policies['INPUT']}")
        return n, accepted, dropped, found, decided_by


def prove_tests(policy: Policy, addresses: dict[str, Addresses], files: dict[str, RuleFiles]) -> list[TestProof]:
    """Every test of the stack, proved for every packet it names against `files` (usually the rendered ones)."""
    prover = TestProver(policy, addresses, files)
    return [prover.prove(i, t) for i, t in enumerate(policy.stack.tests)]
