"""Which packets the lab sends and what the compiled policy says about each: the probe plan.

From every host and outsider to every other host, on every address it can reach, every declared port (and a
never-declared one) over tcp and udp, and icmp; from every host to the lab's Internet (its egress). The
expected verdict of every probe is `enclave.compiler.decide()` (and `egress_verdict()` for the source's own
egress), the policy's reference semantics. Pure logic; enclave/lab/probe.py sends the plan and judges it.

For users: docs/lab.md (what the lab probes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from config.schema import PortSpec

from ..compiler import SSH, Addresses, Endpoint, Flow, Host, Interface, Policy, Source, decide, egress_verdict
from ..plan import Outsiders, is_outside, outside_address

AddressKind = Literal["private", "public", "public6"]

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
class ProbeSet:
    sources: list[Endpoint]
    hosts: list[Host]
    ports: list[PortSpec]  # what is probed
    declared: list[PortSpec]  # what the stack declares (ssh included)
    never_declared: int
    probes: list[Probe]
    sample: list[str] | None = None  # the sampled hosts; None: every host (exhaustive)

    @property
    def exhaustive(self) -> bool:
        return self.sample is None


# --------------------------------------------------------------------------------------------- planning


def probe_numbers(spec: PortSpec) -> list[int]:
    """A range is probed at both ends and in the middle; a short one at every port."""
    if spec.high - spec.low <= 2:
        return list(range(spec.low, spec.high + 1))
    return [spec.low, (spec.low + spec.high) // 2, spec.high]


def probed_ports(specs: tuple[PortSpec, ...]) -> list[PortSpec]:
    """The single ports probed for a test's ports (probe_numbers of each range)."""
    return [s if s.proto == "icmp" else PortSpec(s.proto, n, n) for s in specs for n in
            ([0] if s.proto == "icmp" else probe_numbers(s))]


def declared_ports(policy: Policy) -> list[PortSpec]:
    specs = {SSH, *(p for f in policy.flows for p in f.ports), *(p for t in policy.stack.tests for p in t.ports),
             *(p for allowed in policy.egress.values() for e in allowed for p in e.ports)}
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
    # a port no declaration opens; tests only ask about ports (`port: any` asks about all of them)
    never = never_declared_port(sorted({SSH, *(p for f in policy.flows for p in f.ports)}))
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
        if src.address and a.public:  # a host without public networking has no public address to send to
            out.append(Target(dst.name, "public", a.public))
        if src.address6 and a.public6:
            out.append(Target(dst.name, "public6", a.public6))
    return out


def sample_hosts(policy: Policy) -> list[str]:
    """The hosts probes are sent from and to when the lab samples: the first and the last host of every role,
    and every host a declaration or a test names on its own (a rule about `mysql-3` is only proven by mysql-3).

    Every host of a role gets the same rule text (only set members differ, and those are proven host by host
    from the kernel), so these hosts exercise every (source role, destination role, address, port) there is.
    """
    named = {f.source.name for f in policy.flows if f.source.kind == "host"}
    for test in policy.stack.tests:
        named.update(n for n in (test.sources, test.to) if n in policy.host_by_name)
    chosen: set[str] = set()
    by_role: dict[str, list[Host]] = {}
    for h in policy.hosts:
        by_role.setdefault(h.role, []).append(h)
    for hosts in by_role.values():
        chosen.update({hosts[0].name, hosts[-1].name})
    chosen |= named
    return [h.name for h in policy.hosts if h.name in chosen]


def outside_targets(policy: Policy, others: Outsiders) -> dict[str, str]:
    """Where hosts' egress is probed, by name: the lab's Internet, and an address inside every CIDR a test is sent
    to (the Internet's namespace holds those addresses too, and answers on every probed port)."""
    assert others.internet.address is not None
    out = {"internet": others.internet.address}
    for test in policy.stack.tests:
        if is_outside(test.to) and test.to != "internet":
            out[test.to] = outside_address(test.to, others)
    return out


def has_way_out(policy: Policy, host: str) -> bool:
    """Whether a host has a route to the Internet at all: a private droplet only through the stack's NAT gateway
    (`enclave:natGateway: false` leaves it none, so a probe out would test the routing, not its rules)."""
    role = policy.host_by_name[host].role
    return policy.stack.public_interface(role) is not None or policy.stack.nat_gateway is not None


def outside_probes(policy: Policy, src: Endpoint, targets: dict[str, str], address6: str | None,
                   ports: list[PortSpec]) -> list[Probe]:
    """A host's probes to the Internet (and test CIDRs): what its egress lets out, on every probe port. The
    expected verdict is `egress_verdict()`, shown as a flow from the host to `internet`."""
    host = policy.host_by_name[src.name]
    probes = []
    for name, address in targets.items():
        kinds: list[tuple[AddressKind, str]] = [("public", address)]
        if name == "internet" and address6 and src.address6:
            kinds.append(("public6", address6))
        for kind, addr in kinds:
            target = Target(name, kind, addr)
            for port in ports:
                why = egress_verdict(policy, host, addr, None, port, "public", target.family)
                expected = Flow(Source("host", src.name), name, (port,), why) if why else None
                probes.append(Probe(src, target, port, expected))
    return probes


def plan_probes(policy: Policy, addresses: dict[str, Addresses], others: Outsiders,
                sample: list[str] | None = None) -> ProbeSet:
    """From every host and outsider to every other host, on every address it can reach, every probe port; and
    from every host to the Internet (its egress).

    A probe between hosts gets through when the destination admits it and the source's egress lets it out.
    sample: only these hosts send and receive host-to-host probes and receive the outsiders' (sample_hosts);
    None probes every pair (exhaustive).
    """
    ports, never = probe_ports(policy)
    hosts = [h for h in policy.hosts if sample is None or h.name in set(sample)]
    sources = [host_endpoint(h, addresses) for h in hosts] + [others.internet, others.operator, others.neighbor]
    outside = outside_targets(policy, others)
    probes = []
    for src in sources:
        for dst in hosts:
            if src.kind == "host" and src.name == dst.name:
                continue  # a host reaching itself goes over loopback, which is always open
            for target in targets_from(src, dst, addresses):
                for port in ports:
                    expected = decide(policy, src, dst, port, target.interface, target.family)
                    if expected is not None and src.kind == "host" and egress_verdict(
                            policy, policy.host_by_name[src.name], target.address, dst, port, target.interface,
                            target.family) is None:
                        expected = None  # the source's own egress drops it
                    probes.append(Probe(src, target, port, expected))
        if src.kind == "host" and has_way_out(policy, src.name):
            probes += outside_probes(policy, src, outside, others.internet.address6, ports)
    return ProbeSet(sources, hosts, ports, declared_ports(policy), never, probes, None if sample is None else list(sample))


def exhaustive_probe_count(policy: Policy, addresses: dict[str, Addresses], others: Outsiders) -> int:
    """How many probes an exhaustive run sends, counted without deciding any of them."""
    ports, _ = probe_ports(policy)
    sources = [host_endpoint(h, addresses) for h in policy.hosts] + [others.internet, others.operator, others.neighbor]
    hosts_v6 = sum(1 for h in policy.hosts if addresses[h.name].public6)
    n = len(policy.hosts)
    targets = 0
    for src in sources:
        private = src.kind in ("host", "neighbor")
        public = src.kind != "neighbor" and bool(src.address)
        public6 = src.kind != "neighbor" and bool(src.address6)
        others_n = n - (1 if src.kind == "host" else 0)
        six = hosts_v6 - (1 if src.kind == "host" and src.address6 else 0)
        targets += others_n * (private + public) + (six if public6 else 0)
        if src.kind == "host" and has_way_out(policy, src.name):
            # its egress to the Internet (both families when both have them) and test CIDRs
            targets += len(outside_targets(policy, others)) + bool(src.address6 and others.internet.address6)
    return targets * len(ports)


def listen_ports(ports: list[PortSpec], proto: str, skip: tuple[int, ...] = ()) -> list[int]:
    return sorted({p.low for p in ports if p.proto == proto and p.low not in skip})
