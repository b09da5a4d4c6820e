"""Which packets the lab sends, what the compiled policy says about each, and what real netfilter did.

The expected verdict of every probe is `enclave.compiler.decide()`, the policy's reference semantics; the
seen verdict is whether a real packet got through the pushed rules. Pure logic except `send_probes`, which
talks to the agents (enclave.lab.agent) over their Unix sockets.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from config.schema import PortSpec

from ..compiler import SSH, Addresses, Endpoint, Flow, Host, Interface, Policy, arrival_interface, decide
from ..plan import Outsiders, TestResult, endpoints_for

AddressKind = Literal["private", "public", "public6"]

# A dropped packet just times out. The first verdict uses a short timeout; a probe that the policy admits but
# that timed out is sent again with a long one, so a busy machine cannot turn a slow answer into a mismatch.
# (An unexpected pass needs no second look: a handshake that completed is proof.)
PROBE_TIMEOUT = 0.4
RETRY_TIMEOUT = 2.0
NEVER_DECLARED_CANDIDATES = (9999, 7777, 4444, 31337, 1)


@dataclass(frozen=True)
class Target:
    """One address of a destination host."""

    host: str
    kind: AddressKind
    address: str

    @property
    def interface(self) -> Interface:
        return "private" if self.kind == "private" else "public"

    @property
    def family(self) -> int:
        return 6 if self.kind == "public6" else 4


@dataclass(frozen=True)
class Probe:
    source: Endpoint
    target: Target
    port: PortSpec  # one port (or icmp)
    expected: Flow | None  # the flow that admits it, per decide(); None: it must be dropped

    @property
    def key(self) -> tuple[str, str, AddressKind, PortSpec]:
        return (self.source.name, self.target.host, self.target.kind, self.port)

    def describe(self) -> str:
        t = self.target
        return f"{self.source.name} -> {t.host} {t.address} ({t.kind}) {self.port}"


@dataclass(frozen=True)
class Outcome:
    probe: Probe
    passed: bool  # the packet got through (handshake completed, reply received)
    detail: str  # connected, reply, timeout, refused…

    @property
    def matches(self) -> bool:
        return self.passed == (self.probe.expected is not None)

    def describe(self) -> str:
        p = self.probe
        expected = "allow" if p.expected else "deny"
        seen = "allow" if self.passed else "deny"
        if p.expected is not None:
            why = f"the rule that should admit it: {p.expected.why} ({p.expected.source} -> {p.expected.role})"
        else:
            why = "nothing in the stack admits it, so no rule should"
        return f"{p.describe()}: expected {expected}, seen {seen} ({self.detail}); {why}"


@dataclass(frozen=True)
class ProbeSet:
    sources: list[Endpoint]
    hosts: list[Host]
    ports: list[PortSpec]  # what is probed
    declared: list[PortSpec]  # what the stack declares (ssh included)
    never_declared: int
    probes: list[Probe]


# --------------------------------------------------------------------------------------------- planning


def probe_numbers(spec: PortSpec) -> list[int]:
    """A range is probed at both ends and in the middle; a short one at every port."""
    if spec.high - spec.low <= 2:
        return list(range(spec.low, spec.high + 1))
    return [spec.low, (spec.low + spec.high) // 2, spec.high]


def declared_ports(policy: Policy) -> list[PortSpec]:
    specs = {SSH, *(p for f in policy.flows for p in f.ports), *(t.port for t in policy.stack.tests)}
    return sorted(specs)


def never_declared_port(declared: list[PortSpec]) -> int:
    for port in NEVER_DECLARED_CANDIDATES:
        if not any(spec.low <= port <= spec.high for spec in declared if spec.proto != "icmp"):
            return port
    raise ValueError("every candidate port is declared somewhere")  # 1..9999 all declared: not a real stack


def probe_ports(policy: Policy) -> tuple[list[PortSpec], int]:
    """Every declared port number over both TCP and UDP (a rule must not admit the other protocol),
    a never-declared port, and ICMP echo; plus the never-declared port number."""
    declared = declared_ports(policy)
    numbers = sorted({n for spec in declared if spec.proto != "icmp" for n in probe_numbers(spec)})
    never = never_declared_port(declared)
    ports = [PortSpec(proto, n, n) for n in [*numbers, never] for proto in ("tcp", "udp")]
    return ports + [PortSpec("icmp")], never


def host_endpoint(host: Host, addresses: dict[str, Addresses]) -> Endpoint:
    return Endpoint("host", host.name, addresses[host.name].public, addresses[host.name].public6)


def targets_from(src: Endpoint, dst: Host, addresses: dict[str, Addresses]) -> list[Target]:
    """The addresses of `dst` that `src` can send to: private ones over the VPC (stack hosts and the
    neighbour), public ones over the Internet (hosts and outsiders with an address of that family)."""
    a = addresses[dst.name]
    out = []
    if src.kind in ("host", "neighbor"):
        out.append(Target(dst.name, "private", a.private))
    if src.kind != "neighbor":
        if src.address:
            out.append(Target(dst.name, "public", a.public))
        if src.address6 and a.public6:
            out.append(Target(dst.name, "public6", a.public6))
    return out


def plan_probes(policy: Policy, addresses: dict[str, Addresses], others: Outsiders) -> ProbeSet:
    """From every host and outsider to every other host, on every address it can reach, every probe port."""
    ports, never = probe_ports(policy)
    sources = [host_endpoint(h, addresses) for h in policy.hosts] + [others.internet, others.operator, others.neighbor]
    probes = []
    for src in sources:
        for dst in policy.hosts:
            if src.kind == "host" and src.name == dst.name:
                continue  # a host reaching itself goes over loopback, which is always open
            for target in targets_from(src, dst, addresses):
                for port in ports:
                    expected = decide(policy, src, dst, port, target.interface, target.family)
                    probes.append(Probe(src, target, port, expected))
    return ProbeSet(sources, list(policy.hosts), ports, declared_ports(policy), never, probes)


def listen_ports(ports: list[PortSpec], proto: str, skip: tuple[int, ...] = ()) -> list[int]:
    return sorted({p.low for p in ports if p.proto == proto and p.low not in skip})


# ---------------------------------------------------------------------------------------------- sending


async def _ask_agent(socket_path: str, batch: list[tuple[int, Probe]], timeout: float) -> dict[int, tuple[bool, str]]:
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=1 << 24)
    try:
        request = [[i, p.port.proto, p.target.address, p.port.low, timeout] for i, p in batch]
        writer.write(json.dumps({"probes": request}).encode() + b"\n")
        await writer.drain()
        # Every probe ends by its own timeout; the margin covers a busy machine, not a lost agent forever.
        line = await asyncio.wait_for(reader.readline(), timeout * 4 + 30)
    finally:
        writer.close()
    if not line:
        raise RuntimeError(f"the probe agent at {socket_path} closed the connection (see its log next to it)")
    return {int(i): (bool(passed), str(detail)) for i, passed, detail in json.loads(line)["results"]}


async def _send(agents: dict[str, str], probes: list[Probe], timeout: float,
                on_answer: Callable[[int], None] | None = None) -> list[tuple[bool, str]]:
    batches: dict[str, list[tuple[int, Probe]]] = {}
    for i, probe in enumerate(probes):
        batches.setdefault(probe.source.name, []).append((i, probe))

    async def ask(name: str, batch: list[tuple[int, Probe]]) -> dict[int, tuple[bool, str]]:
        answer = await _ask_agent(agents[name], batch, timeout)
        if on_answer is not None:
            on_answer(len(batch))
        return answer

    answers = await asyncio.gather(*(ask(name, batch) for name, batch in batches.items()))
    merged = {i: verdict for answer in answers for i, verdict in answer.items()}
    return [merged[i] for i in range(len(probes))]


def send_probes(agents: dict[str, str], probes: list[Probe],
                on_answer: Callable[[int], None] | None = None) -> list[Outcome]:
    """Every probe at once, each from its source's agent; admitted probes that timed out get a second, longer try.

    `agents` maps a source name (host or outsider) to its agent's control socket; `on_answer(n)` hears when a
    source's n probes have their first verdict (the lab's progress display).
    """
    verdicts = asyncio.run(_send(agents, probes, PROBE_TIMEOUT, on_answer))
    outcomes = [Outcome(p, passed, detail) for p, (passed, detail) in zip(probes, verdicts)]
    again = [i for i, o in enumerate(outcomes) if not o.passed and o.probe.expected is not None and o.detail == "timeout"]
    if again:
        retried = asyncio.run(_send(agents, [probes[i] for i in again], RETRY_TIMEOUT))
        for i, (passed, detail) in zip(again, retried):
            outcomes[i] = Outcome(probes[i], passed, detail if passed else f"{detail} (twice, {RETRY_TIMEOUT:g} s)")
    return outcomes


# ------------------------------------------------------------------------------------------------ tests


def tests_with_packets(
    policy: Policy, addresses: dict[str, Addresses], others: Outsiders, outcomes: list[Outcome]
) -> list[TestResult]:
    """The stack's `tests`, judged by real packets: each pair it names, on the address the source would use."""
    by_key = {o.probe.key: o for o in outcomes}
    results = []
    for i, test in enumerate(policy.stack.tests):
        allowed: list[str] = []
        denied: list[str] = []
        for src in endpoints_for(test.sources, policy, others, addresses):
            kind: AddressKind = arrival_interface(src)
            for dst in policy.hosts_of(test.to):
                if src.kind == "host" and src.name == dst.name:
                    continue  # loopback, always open
                outcome = by_key.get((src.name, dst.name, kind, test.port))
                if outcome is None:
                    denied.append(f"{src.name}->{dst.name} (not probed: {src.name} has no {kind} route to it)")
                elif outcome.passed:
                    allowed.append(f"{src.name}->{dst.name} {outcome.probe.target.address}")
                else:
                    denied.append(f"{src.name}->{dst.name} {outcome.probe.target.address} ({outcome.detail})")
        detail = "; ".join((denied if test.expect == "allow" else allowed)[:5])
        results.append(TestResult(i, test, TestResult.verdict(len(allowed), len(denied)), detail))
    return results


# ----------------------------------------------------------------------------------------------- report


@dataclass
class LabReport:
    stack_name: str
    run_id: str
    probe_set: ProbeSet
    outcomes: list[Outcome]
    tests: list[TestResult]  # the stack's tests, judged by real packets
    policy_tests: list[TestResult]  # the same tests, judged by the compiled policy (as `enclave plan` does)
    push_failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds

    @property
    def mismatches(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.matches]

    @property
    def failed_tests(self) -> list[TestResult]:
        return [t for t in self.tests if not t.passed]

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.failed_tests and not self.push_failures

    def to_json(self) -> dict[str, Any]:
        """`enclave lab check --format json`: every probe with both verdicts and the flow behind the expected
        one, the stack's tests judged by packets and by the policy, the failed pushes, and a summary."""
        by_policy = {t.index: t for t in self.policy_tests}
        passed = sum(o.passed for o in self.outcomes)
        return {
            "stack": self.stack_name,
            "run": self.run_id,
            "ok": self.ok,
            "summary": {
                "probes": len(self.outcomes),
                "gotThrough": passed,
                "dropped": len(self.outcomes) - passed,
                "mismatches": len(self.mismatches),
                "tests": len(self.tests),
                "testsFailed": len(self.failed_tests),
                "pushFailures": len(self.push_failures),
                "seconds": {phase: round(seconds, 3) for phase, seconds in self.timings.items()},
            },
            "pushFailures": self.push_failures,
            "tests": [
                {
                    "test": t.describe(),
                    "expect": t.test.expect,
                    "packets": t.seen,
                    "policy": by_policy[t.index].seen if t.index in by_policy else None,
                    "passed": t.passed,
                    "detail": t.detail,
                }
                for t in self.tests
            ],
            "probes": [
                {
                    "src": o.probe.source.name,
                    "dst": o.probe.target.host,
                    "address": o.probe.target.address,
                    "kind": o.probe.target.kind,
                    "port": str(o.probe.port),
                    "expected": "allow" if o.probe.expected else "deny",
                    "seen": "allow" if o.passed else "deny",
                    "matches": o.matches,
                    "detail": o.detail,
                    "why": o.probe.expected.why if o.probe.expected else None,
                    "flow": f"{o.probe.expected.source} -> {o.probe.expected.role}" if o.probe.expected else None,
                }
                for o in self.outcomes
            ],
        }
