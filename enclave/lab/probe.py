"""What real netfilter did with the lab's probes: sending them, judging the stack's tests by them, the report.

The probes and their expected verdicts are planned in enclave/lab/planning.py (re-exported here, where the
lab and its tests import them from); the seen verdict is whether a real packet got through the pushed rules.
Pure logic except `send_probes`, which talks to the agents (enclave.lab.agent) over their Unix sockets.

For users: docs/lab.md (what the lab probes and reports).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from ..compiler import Addresses, Policy, arrival_interface
from ..plan import Outsiders, TestResult, endpoints_for, is_outside
from .planning import (
    AddressKind as AddressKind,
    Probe as Probe,
    ProbeSet as ProbeSet,
    Target as Target,
    exhaustive_probe_count as exhaustive_probe_count,
    listen_ports as listen_ports,
    outside_targets as outside_targets,
    plan_probes as plan_probes,
    probe_numbers as probe_numbers,
    probe_ports as probe_ports,
    probed_ports,
    sample_hosts as sample_hosts,
)

# A dropped packet just times out. The first verdict uses a short timeout; a probe that the policy admits but
# that timed out is sent again with a long one, so a busy machine cannot turn a slow answer into a mismatch.
# (An unexpected pass needs no second look: a handshake that completed is proof.)
PROBE_TIMEOUT = 0.4
RETRY_TIMEOUT = 2.0


@dataclass(frozen=True)
class Outcome:
    probe: Probe
    passed: bool  # the packet got through (handshake completed, reply received)
    detail: str  # connected, reply, timeout, refused…

    @property
    def matches(self) -> bool:
        return self.passed == (self.probe.expected is not None)

    @property
    def kernel_error(self) -> bool:
        """The source's kernel could not send it (not a verdict of any firewall): a failure of the harness."""
        return not self.detail.split(" (twice")[0] in FIREWALL_DETAILS

    def describe(self) -> str:
        p = self.probe
        expected = "allow" if p.expected else "deny"
        seen = "allow" if self.passed else "deny"
        if p.expected is not None:
            why = f"the rule that should admit it: {p.expected.why} ({p.expected.source} -> {p.expected.role})"
        else:
            why = "nothing in the stack admits it, so no rule should"
        return f"{p.describe()}: expected {expected}, seen {seen} ({self.detail}); {why}"


# ---------------------------------------------------------------------------------------------- sending


class HarnessError(Exception):
    """The lab's own machinery failed (an agent stopped answering, the kernel refused a packet): no verdict on
    the rules can be drawn from this run (exit 3)."""


# What the firewall can make of a probe. Anything else (enobufs, ehostunreach, enetunreach…) is the source's
# own kernel failing to send it (a full neighbour table, a missing route): the harness, not the rules.
FIREWALL_DETAILS = ("connected", "reply", "timeout", "refused (REJECT or no listener)",
                    "blocked by the source's own OUTPUT rules")
# However many probes are queued, the agent streams results as they finish; this long without the next line,
# it is lost (a busy machine delays a line by seconds, not by a minute).
AGENT_SILENCE_S = 60.0


async def _ask_agent(socket_path: str, batch: list[tuple[int, Probe]], timeout: float,
                     on_answer: Callable[[int], None] | None) -> dict[int, tuple[bool, str]]:
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=1 << 26)
    results: dict[int, tuple[bool, str]] = {}
    try:
        request = [[i, p.source.name, p.port.proto, p.target.address, p.port.low, timeout] for i, p in batch]
        writer.write(json.dumps({"probes": request}).encode() + b"\n")
        await writer.drain()
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), AGENT_SILENCE_S + timeout)
            except asyncio.TimeoutError:
                raise HarnessError(
                    f"the probe agent ({socket_path}) sent no result for {AGENT_SILENCE_S + timeout:g} s with "
                    f"{len(batch) - len(results)} of {len(batch)} probes outstanding"
                ) from None
            if not line:
                raise HarnessError(f"the probe agent ({socket_path}) closed the connection with "
                                   f"{len(batch) - len(results)} probes outstanding (see agents/agent.log)")
            message = json.loads(line)
            if "done" in message:
                break
            for i, passed, detail in message["results"]:
                results[int(i)] = (bool(passed), str(detail))
            if on_answer is not None:
                on_answer(len(message["results"]))
    finally:
        writer.close()
    if len(results) != len(batch):
        raise HarnessError(f"the probe agent answered {len(results)} of {len(batch)} probes")
    return results


async def _send(agents: dict[str, str], probes: list[Probe], timeout: float,
                on_answer: Callable[[int], None] | None = None) -> list[tuple[bool, str]]:
    batches: dict[str, list[tuple[int, Probe]]] = {}
    for i, probe in enumerate(probes):
        batches.setdefault(agents[probe.source.name], []).append((i, probe))
    answers = await asyncio.gather(*(_ask_agent(path, batch, timeout, on_answer) for path, batch in batches.items()))
    merged = {i: verdict for answer in answers for i, verdict in answer.items()}
    return [merged[i] for i in range(len(probes))]


def send_probes(agents: dict[str, str], probes: list[Probe],
                on_answer: Callable[[int], None] | None = None,
                admitted: Callable[[Probe], bool] | None = None) -> list[Outcome]:
    """Every probe at once, each from its source's namespace; admitted probes that timed out get a second, longer try.

    `agents` maps a source name (host or outsider) to the control socket of the agent serving its namespace;
    `on_answer(n)` hears when n more probes have their first verdict (the lab's progress display);
    `admitted(probe)` says which probes are expected through (default: those the policy admits), the ones a
    timeout sends again. Raises HarnessError when an agent stops answering.
    """
    if not probes:
        return []
    verdicts = asyncio.run(_send(agents, probes, PROBE_TIMEOUT, on_answer))
    outcomes = [Outcome(p, passed, detail) for p, (passed, detail) in zip(probes, verdicts)]
    expected = admitted or (lambda probe: probe.expected is not None)
    again = [i for i, o in enumerate(outcomes) if not o.passed and expected(o.probe) and o.detail == "timeout"]
    if again:
        retried = asyncio.run(_send(agents, [probes[i] for i in again], RETRY_TIMEOUT))
        for i, (passed, detail) in zip(again, retried):
            outcomes[i] = Outcome(probes[i], passed, detail if passed else f"{detail} (twice, {RETRY_TIMEOUT:g} s)")
    return outcomes


# ------------------------------------------------------------------------------------------------ tests


def tests_with_packets(
    policy: Policy, addresses: dict[str, Addresses], others: Outsiders, outcomes: list[Outcome],
    sample: list[str] | None = None,
) -> list[TestResult]:
    """The stack's `tests`, judged by real packets: each pair it names, on the address the source would use
    (with a sample: each pair among the sampled hosts; the other hosts' rules are proven equal to theirs)."""
    by_key = {o.probe.key: o for o in outcomes}
    sampled = None if sample is None else set(sample)
    results = []
    for i, test in enumerate(policy.stack.tests):
        allowed: list[str] = []
        denied: list[str] = []

        def tally(outcome: Outcome | None, label: str, unprobed: str) -> None:
            """One probe of the test: admitted, dropped, or never sent (counted as not admitted)."""
            if outcome is None:
                denied.append(f"{label} ({unprobed})")
            elif outcome.passed:
                allowed.append(f"{label} {outcome.probe.target.address}")
            else:
                denied.append(f"{label} {outcome.probe.target.address} ({outcome.detail})")

        for src in endpoints_for(test.sources, policy, others, addresses):
            kind: AddressKind = arrival_interface(src)
            if sampled is not None and src.kind == "host" and src.name not in sampled:
                continue
            if is_outside(test.to):
                (port,) = test.ports  # one port (the schema's rule for a test to internet or a CIDR)
                tally(by_key.get((src.name, test.to, "public", port)), f"{src.name}->{test.to}", "not probed")
                continue
            for dst in policy.hosts_of(test.to):
                if src.kind == "host" and src.name == dst.name:
                    continue  # loopback, always open
                if sampled is not None and dst.name not in sampled:
                    continue
                for port in probed_ports(test.ports):  # a range or `any`: its ends and middle (the verifier
                    shown = f" {port}" if port != test.port else ""  # proves every port at plan time)
                    tally(by_key.get((src.name, dst.name, kind, port)), f"{src.name}->{dst.name}{shown}",
                          f"not probed: {src.name} has no {kind} route to it")
        detail = "; ".join((denied if test.expect == "allow" else allowed)[:5])
        results.append(TestResult(i, test, TestResult.verdict(len(allowed), len(denied)), detail))
    return results


# ----------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class HostProof:
    """One host's live firewall, read back from its kernel, against what the compiler says it must be."""

    host: str
    ok: bool
    detail: str  # what differs (the first lines of a diff), or what was compared


MAX_LISTED_PROBES = 20_000  # above this, --format json lists the mismatches, not every probe


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
    host_proofs: list[HostProof] = field(default_factory=list)  # every host's live rules, sets and digest
    harness: list[str] = field(default_factory=list)  # why this run cannot judge the rules, if it cannot

    @property
    def mismatches(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.matches]

    @property
    def failed_tests(self) -> list[TestResult]:
        return [t for t in self.tests if not t.passed]

    @property
    def failed_proofs(self) -> list[HostProof]:
        return [p for p in self.host_proofs if not p.ok]

    @property
    def harness_failed(self) -> bool:
        return bool(self.harness)

    @property
    def ok(self) -> bool:
        return (not self.harness and not self.mismatches and not self.failed_tests and not self.push_failures
                and not self.failed_proofs)

    def to_json(self) -> dict[str, Any]:
        """`enclave lab check --format json`: a summary, the harness's health, every host's proof, the stack's
        tests judged by packets and by the policy, the failed pushes, every mismatch with the flow behind its
        expected verdict, and every probe while there are at most MAX_LISTED_PROBES of them (a summary per
        source and destination role otherwise)."""
        by_policy = {t.index: t for t in self.policy_tests}
        passed = sum(o.passed for o in self.outcomes)
        listed = len(self.outcomes) <= MAX_LISTED_PROBES
        document: dict[str, Any] = {
            "stack": self.stack_name,
            "run": self.run_id,
            "ok": self.ok,
            "harnessFailed": self.harness_failed,
            "summary": {
                "mode": "exhaustive" if self.probe_set.exhaustive else "sampled",
                "sampledHosts": self.probe_set.sample,
                "probes": len(self.outcomes),
                "gotThrough": passed,
                "dropped": len(self.outcomes) - passed,
                "mismatches": len(self.mismatches),
                "hostsProven": sum(p.ok for p in self.host_proofs),
                "hostsFailed": len(self.failed_proofs),
                "tests": len(self.tests),
                "testsFailed": len(self.failed_tests),
                "pushFailures": len(self.push_failures),
                "seconds": {phase: round(seconds, 3) for phase, seconds in self.timings.items()},
            },
            "harness": self.harness,
            "pushFailures": self.push_failures,
            "hostsFailed": [{"host": p.host, "detail": p.detail} for p in self.failed_proofs],
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
            "mismatches": [_probe_json(o) for o in self.mismatches[:MAX_LISTED_PROBES]],
        }
        if listed:
            document["probes"] = [_probe_json(o) for o in self.outcomes]
        else:
            document["probesByRole"] = role_summary(self)
        return document


def _probe_json(o: Outcome) -> dict[str, Any]:
    return {
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


def source_group(report: LabReport, name: str) -> str:
    """A host's role, or the outsider's name: the rows of the role x role matrix."""
    host = next((h for h in report.probe_set.hosts if h.name == name), None)
    return host.role if host is not None else name


def role_summary(report: LabReport) -> list[dict[str, Any]]:
    """Per (source role or outsider, destination role, address kind): probes, what got through, mismatches."""
    roles = {h.name: h.role for h in report.probe_set.hosts}
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for o in report.outcomes:
        key = (roles.get(o.probe.source.name, o.probe.source.name), roles.get(o.probe.target.host, o.probe.target.host),
               o.probe.target.kind)
        g = groups.setdefault(key, {"src": key[0], "dst": key[1], "kind": key[2], "probes": 0, "allowed": set(),
                                    "mismatches": 0})
        g["probes"] += 1
        g["mismatches"] += not o.matches
        if o.passed:
            g["allowed"].add(str(o.probe.port))
    return [{**g, "allowed": sorted(g["allowed"])} for g in groups.values()]
