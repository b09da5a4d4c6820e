"""Roles -> hosts -> flows -> the policy's meaning.

A *flow* says "these sources may open connections to every host of this role, on these ports, arriving on this
interface". Flows are the single source of truth: the renderer turns them into iptables rules, `decide()` turns
them into a verdict for one concrete packet (the reference the lab's real packets are compared against), and the
plan prints them as the flow table.

Pure logic: no Pulumi, no I/O.

For users: docs/stack-file.md (what a declaration means) and docs/threat-model.md.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from config.schema import PortSpec, StackConfig

Interface = Literal["public", "private"]
SourceKind = Literal["role", "host", "internet", "operators", "cidr"]

SSH = PortSpec("tcp", 22, 22)


@dataclass(frozen=True, order=True)
class Host:
    role: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass(frozen=True)
class Addresses:
    """A host's addresses: the inputs that make a policy concrete (Pulumi outputs, lab or example plan)."""

    public: str | None  # None: a droplet without public networking (a role with `public: false`)
    private: str
    public6: str | None = None

    def require_public(self, host: str) -> str:
        """The public IPv4 address, for what only a host with public networking has (a bastion dialed from
        outside); a private host here is a bug in the caller, since the schema gives private roles bastions."""
        if self.public is None:
            raise ValueError(f"{host} has no public address (its role has `public: false`)")
        return self.public


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    name: str  # role name, host name, 'internet', 'operators' or the CIDR text

    @property
    def interface(self) -> Interface:
        return "private" if self.kind in ("role", "host") else "public"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Flow:
    source: Source
    role: str  # destination role
    ports: tuple[PortSpec, ...]
    why: str  # where it comes from: a stack key, or the built-in SSH policy
    description: str | None = None  # the entry's `description:`, carried into comments, plan and diagram

    @property
    def interface(self) -> Interface:
        return self.source.interface


@dataclass(frozen=True)
class Endpoint:
    """Where a probe or a test starts: a stack host, or an outsider with an address."""

    kind: Literal["host", "internet", "operators", "neighbor"]
    name: str
    address: str | None = None  # public/outsider address used for CIDR and operator matching
    address6: str | None = None


DestinationKind = Literal["role", "host", "all", "internet", "cidr"]

# What a role with an egress allowlist may always reach (`enclave:egressEssentials` switches each off).
# DigitalOcean's resolvers are what its droplets' resolv.conf (netplan) names; the metadata service is where
# cloud-init and the droplet agent read the droplet's configuration.
DO_RESOLVERS = ("67.207.67.2", "67.207.67.3")
METADATA_SERVICE = "169.254.169.254"
DNS_PORTS = (PortSpec("tcp", 53, 53), PortSpec("udp", 53, 53))
METADATA_PORTS = (PortSpec("tcp", 80, 80),)
NTP_PORTS = (PortSpec("udp", 123, 123),)


@dataclass(frozen=True)
class EgressFlow:
    """One destination a role with an egress allowlist may open connections to (an entry, or an essential)."""

    kind: DestinationKind
    to: str  # role or host name, 'all', 'internet' or the CIDR text
    ports: tuple[PortSpec, ...]
    interface: Interface | None  # None: any interface (the address alone decides: the essentials)
    why: str  # the stack key, or `egress essential: dns`
    description: str | None = None

    def admits(self, dst_address: str | None, dst_host: Host | None, port: PortSpec, interface: Interface | None,
               family: int) -> bool:
        if not any(p.contains(port) for p in self.ports):
            return False
        if self.interface is not None and self.interface != interface:
            return False
        if self.kind in ("role", "host", "all"):
            if dst_host is None or family != 4:
                return False
            return self.kind == "all" or self.to in (dst_host.role, dst_host.name)
        if self.kind == "internet":
            return True
        net = ipaddress.ip_network(self.to)
        return dst_address is not None and net.version == family and ipaddress.ip_address(dst_address) in net


def essentials(stack: StackConfig) -> list[EgressFlow]:
    """The essentials an egress allowlist keeps, in rule order; each is one named rule (or one per resolver)."""
    switch = stack.egress_essentials
    out = []
    if switch.dns:
        out += [EgressFlow("cidr", f"{r}/32", DNS_PORTS, None, "egress essential: dns (DigitalOcean resolver)")
                for r in DO_RESOLVERS]
    if switch.metadata:
        out.append(EgressFlow("cidr", f"{METADATA_SERVICE}/32", METADATA_PORTS, None,
                              "egress essential: metadata service"))
    if switch.ntp:
        out.append(EgressFlow("internet", "internet", NTP_PORTS, "public", "egress essential: ntp"))
    return out


@dataclass
class Policy:
    stack: StackConfig
    flows: list[Flow] = field(default_factory=list)
    # role -> what its egress allowlist lets it open (entries, then essentials); roles without one are absent
    egress: dict[str, list[EgressFlow]] = field(default_factory=dict)

    @cached_property
    def hosts(self) -> list[Host]:
        return [Host(role, n) for role, spec in self.stack.roles.items() for n in range(1, spec.count + 1)]

    @cached_property
    def host_by_name(self) -> dict[str, Host]:
        return {h.name: h for h in self.hosts}

    @cached_property
    def flows_to_role(self) -> dict[str, list[Flow]]:
        out: dict[str, list[Flow]] = {role: [] for role in self.stack.roles}
        for flow in self.flows:
            out[flow.role].append(flow)
        return out

    def flows_from_host(self, host: Host) -> list[Flow]:
        """Private-interface flows this host is a source of (what restricted egress lets out)."""
        return [f for f in self.flows if f.interface == "private" and source_matches_host(f.source, host)]

    def bastion_hosts(self) -> list[Host]:
        return [h for h in self.hosts if self.stack.roles[h.role].bastion]

    def hosts_of(self, name: str) -> list[Host]:
        """A role name or a host name -> the hosts it stands for."""
        if name in self.stack.roles:
            return [h for h in self.hosts if h.role == name]
        return [self.host_by_name[name]] if name in self.host_by_name else []


def source_matches_host(source: Source, host: Host) -> bool:
    return (source.kind == "role" and source.name == host.role) or (source.kind == "host" and source.name == host.name)


def _source(stack: StackConfig, text: str) -> Source:
    if text in ("internet", "operators"):
        return Source(text, text)  # type: ignore[arg-type]
    if text in stack.roles:
        return Source("role", text)
    if stack.role_of_host(text):
        return Source("host", text)
    return Source("cidr", str(ipaddress.ip_network(text, strict=True)))


def compile_policy(stack: StackConfig) -> Policy:
    """The flows of a validated stack: the built-in SSH access first, then each role's declared ingress."""
    flows: list[Flow] = []
    bastions = stack.bastion_roles()
    for role_name, role in stack.roles.items():
        if role.bastion:
            flows.append(Flow(Source("operators", "operators"), role_name, (SSH,), "bastion: ssh from operators"))
        if bastions:
            for bastion in bastions:
                flows.append(Flow(Source("role", bastion), role_name, (SSH,), f"ssh through bastion {bastion}"))
        else:
            flows.append(Flow(Source("operators", "operators"), role_name, (SSH,), "no bastion: ssh from operators"))
        for i, rule in enumerate(role.ingress):
            why = f"roles.{role_name}.ingress[{i}]"
            for text in rule.sources:
                # `all`: every role's hosts as the stack is now, so a role added later is admitted too
                sources = [Source("role", r) for r in stack.roles] if text == "all" else [_source(stack, text)]
                flows += [Flow(source, role_name, tuple(rule.ports), why, rule.description) for source in sources]
    egress = {name: _egress_flows(stack, name) for name, role in stack.roles.items() if role.allowlist is not None}
    return Policy(stack, flows, egress)


def _egress_flows(stack: StackConfig, role_name: str) -> list[EgressFlow]:
    out = []
    for i, entry in enumerate(stack.roles[role_name].allowlist or []):
        why = f"roles.{role_name}.egress[{i}]"
        for text in entry.to:
            kind: DestinationKind
            interface: Interface = "private"
            if text in ("all", "internet"):
                kind, to = text, text  # type: ignore[assignment]
                interface = "public" if text == "internet" else "private"
            elif text in stack.roles:
                kind, to = "role", text
            elif stack.role_of_host(text):
                kind, to = "host", text
            else:
                net = ipaddress.ip_network(text, strict=True)
                kind, to = "cidr", str(net)
                inside = net.version == 4 and net.subnet_of(stack.vpc_ip_range)
                interface = "private" if inside else "public"
            out.append(EgressFlow(kind, to, tuple(entry.ports), interface, why, entry.description))
    return out + essentials(stack)


def egress_verdict(policy: Policy, src: Host, dst_address: str | None, dst_host: Host | None, port: PortSpec,
                   interface: Interface | None, family: int = 4) -> str | None:
    """Why `src` may open this connection (to `dst_address`, the stack host `dst_host` if it is one, leaving by
    `interface`, None for another one), or None when its egress drops it. What the rendered OUTPUT chain means.

    open: anything. restricted: anything out of the public interface; on the private one, what the destination
    host admits from `src`. An allowlist: on the private interface what the destination admits, then the listed
    entries, then the essentials; nothing else on any interface.
    """
    role = policy.stack.roles[src.role]
    if role.egress == "open":
        return "egress open"
    if role.egress == "restricted" and interface == "public":
        return "egress restricted: new connections out of the public interface"
    if interface == "private" and dst_host is not None and family == 4:
        flow = decide(policy, Endpoint("host", src.name), dst_host, port, "private", family)
        if flow is not None:
            return f"{flow.why} (what {dst_host.name} admits from {src.name})"
    for allowed in policy.egress.get(src.role, []):
        if allowed.admits(dst_address, dst_host, port, interface, family):
            return allowed.why
    return None


# ------------------------------------------------------------------------------------------ semantics


def _source_admits(policy: Policy, source: Source, src: Endpoint, interface: Interface, family: int) -> bool:
    if source.interface != interface:
        return False
    if source.kind in ("role", "host"):
        host = policy.host_by_name.get(src.name) if src.kind == "host" else None
        return host is not None and source_matches_host(source, host)
    if source.kind == "internet":
        return True
    addr_text = src.address if family == 4 else src.address6
    if addr_text is None:
        return False
    addr = ipaddress.ip_address(addr_text)
    if source.kind == "operators":
        return any(addr in net for net in policy.stack.operators if net.version == family)
    net = ipaddress.ip_network(source.name)
    return net.version == family and addr in net


def decide(
    policy: Policy, src: Endpoint, dst: Host, port: PortSpec, interface: Interface, family: int = 4
) -> Flow | None:
    """The flow that admits this packet (src -> dst:port arriving on `interface`), or None if it is dropped.

    This is what the rendered rules mean; the lab checks real netfilter against it packet by packet.
    Egress restrictions never change a verdict between stack hosts: a restricted host may send on its
    private interface exactly what its peers accept from it.
    """
    if interface == "private" and family == 6:
        return None  # DigitalOcean VPCs are IPv4 only
    if family == 6 and not policy.stack.roles[dst.role].ipv6:
        return None
    if interface == "public" and not policy.stack.roles[dst.role].public:
        return None  # no public networking: nothing arrives from outside the VPC
    for flow in policy.flows_to_role[dst.role]:
        if not any(p.contains(port) for p in flow.ports):
            continue
        if _source_admits(policy, flow.source, src, interface, family):
            return flow
    return None


def arrival_interface(src: Endpoint) -> Interface:
    """Stack hosts and private-network neighbours reach a host's private address; outsiders its public one."""
    return "private" if src.kind in ("host", "neighbor") else "public"
