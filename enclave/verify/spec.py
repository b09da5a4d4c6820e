"""The intent a host's rules must equal, written once: the compiled policy plus what every host admits by design.

By design (render.py explains each): ICMP and ICMPv6 redirects dropped in every state on every interface;
loopback; replies and the errors about a connection (ESTABLISHED,
RELATED); INVALID dropped; on the public interface of a role with `ipv6`, neighbour solicitations and
advertisements with hop limit 255, router advertisements from fe80::/10 with hop limit 255 and MLD queries from
fe80::/10 with hop limit 1, whatever their conntrack state. Every other packet (NEW or UNTRACKED) is what
`enclave.compiler.decide()` says, the function the plan and the lab use. Outgoing: open, or for
`egress: restricted` loopback, replies, anything out of the public interface, and on the private interface
exactly what the destination host accepts from this one. A role with `public: false` has one interface, the
private one (`interfaces.privateOnly`): nothing arrives on a public one, and restricted egress lets out to the
Internet (through the NAT gateway) what leaves it for an IPv4 address outside the VPC range. For an egress
allowlist: loopback, replies, on a role
with `ipv6` the ICMPv6 control it sends on the public link, and every other packet what
`enclave.compiler.egress_verdict()` says (what peers admit, the listed entries, the essentials).

Out of scope: FORWARD (ENCLAVE-FORWARD, what the host forwards to its containers). render.forward_rules derives
it line for line from ENCLAVE-INPUT's accepts, tests/unit/test_verify.py checks that correspondence, and the lab
proves it with packets (tests/lab/test_lab_redteam.py); the proofs here cover INPUT and OUTPUT.
"""

from __future__ import annotations

import ipaddress

from config.schema import PortSpec

from ..compiler import Addresses, Endpoint, Host, Interface, Policy, decide, egress_verdict
from ..render import ICMPV6_ND, ICMPV6_SENT, LINK_LOCAL, MLD_HOP_LIMIT, MLD_QUERY, ND_HOP_LIMIT
from .engine import Packet, Regions
from .parse import ICMP_TYPES, ICMPV6_TYPES

ECHO = {4: 8, 6: 128}
REDIRECT = {4: ICMP_TYPES["redirect"], 6: ICMPV6_TYPES["redirect"]}
LL = ipaddress.ip_network(LINK_LOCAL)
LL_INTERVAL = (int(LL.network_address), int(LL.broadcast_address) + 1)
ND = {ICMPV6_TYPES[name]: name for name in ICMPV6_ND if name != "router-advertisement"}
RA = ICMPV6_TYPES["router-advertisement"]
MLD = int(MLD_QUERY)
SENT = {ICMPV6_TYPES.get(name) or int(name): name for name in ICMPV6_SENT}


def _interval(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address) + 1


def as_int(text: str) -> int:
    return int(ipaddress.ip_address(text))


class AddressIndex:
    """The stack's addresses as integers, computed once for every host of a fleet."""

    def __init__(self, policy: Policy, addresses: dict[str, Addresses]) -> None:
        self.host_at: dict[int, Host] = {as_int(addresses[h.name].private): h for h in policy.hosts}
        outsiders = {4: ["192.0.2.10", "10.255.255.254"], 6: ["2001:db8:ff::10", "fe80::1"]}
        publics = {4: [a.public for a in addresses.values() if a.public], 6: [a.public6 for a in addresses.values() if a.public6]}
        self.preferred = {4: list(self.host_at) + [as_int(x) for x in outsiders[4] + publics[4]],
                          6: [as_int(x) for x in outsiders[6] + publics[6]]}


class HostIntent:
    """The intent for one host of a compiled policy with concrete addresses."""

    def __init__(self, policy: Policy, addresses: dict[str, Addresses], host: Host,
                 index: AddressIndex | None = None) -> None:
        self.policy, self.addresses, self.host = policy, addresses, host
        stack = policy.stack
        self.role = stack.roles[host.role]
        self.public, self.private = stack.public_interface(host.role), stack.private_interface(host.role)
        self.vpc = _interval(stack.vpc_ip_range)
        self.restricted = self.role.egress != "open"
        self.allowlist = policy.egress.get(host.role)
        self.index = index if index is not None else AddressIndex(policy, addresses)
        self.host_at = self.index.host_at

    # --- boundaries --------------------------------------------------------------------------------

    def _role_regions(self) -> Regions:
        regions: Regions = {}
        for addr, h in self.host_at.items():
            regions.setdefault(("role", h.role), []).append((addr, addr + 1))
        return regions

    def src_regions(self, family: int, hook: str) -> Regions:
        if hook == "OUTPUT":
            return {}
        regions: Regions = self._role_regions() if family == 4 else {}
        for flow in self.policy.flows_to_role[self.host.role]:
            src = flow.source
            if src.kind == "host" and family == 4:
                addr = int(ipaddress.ip_address(self.addresses[src.name].private))
                regions[("host", src.name)] = [(addr, addr + 1)]
            elif src.kind == "operators":
                regions[("operators",)] = [_interval(n) for n in self.policy.stack.operators if n.version == family]
            elif src.kind == "cidr" and ipaddress.ip_network(src.name).version == family:
                regions[("cidr", src.name)] = [_interval(ipaddress.ip_network(src.name))]
        if family == 6:
            regions[("link-local",)] = [LL_INTERVAL]
        return regions

    def dst_regions(self, family: int, hook: str) -> Regions:
        if hook != "OUTPUT" or not self.restricted:
            return {}
        # decide() sees a destination host only through its role; an allowlist adds its CIDRs (essentials too);
        # without a public interface, the Internet is what lies outside the VPC range
        regions: Regions = self._role_regions() if family == 4 else {}
        if family == 4 and self.public is None:
            regions[("vpc",)] = [self.vpc]
        for allowed in self.allowlist or []:
            if allowed.kind == "host" and family == 4:
                addr = as_int(self.addresses[allowed.to].private)
                regions[("host", allowed.to)] = [(addr, addr + 1)]
            elif allowed.kind == "cidr" and ipaddress.ip_network(allowed.to).version == family:
                regions[("egress", allowed.to)] = [_interval(ipaddress.ip_network(allowed.to))]
        return regions

    def interfaces(self) -> list[str]:
        return ["lo", *([self.public] if self.public else []), self.private]

    def ports(self, hook: str) -> list[tuple[int, int]]:
        flows = self.policy.flows if hook == "OUTPUT" else self.policy.flows_to_role[self.host.role]
        listed = [p for e in self.allowlist or [] for p in e.ports] if hook == "OUTPUT" else []
        return [(p.low, p.high) for p in [*(p for f in flows for p in f.ports), *listed] if p.proto != "icmp"]

    def icmp_types(self, family: int) -> list[int]:
        return [ECHO[family], REDIRECT[family]] + ([MLD, RA, *ND, *SENT] if family == 6 else [])

    def hop_limits(self, family: int) -> list[int]:
        return [ND_HOP_LIMIT, MLD_HOP_LIMIT] if family == 6 else []

    def preferred(self, family: int, hook: str, side: str) -> list[int]:
        """Addresses shown in counterexamples when their class holds them, best first: this host's own as the
        destination of what it receives, the other hosts' private addresses, an outsider, then public ones."""
        mine = self.addresses[self.host.name]
        own = [mine.private, mine.public] if family == 4 else [mine.public6]
        mine_int = [as_int(x) for x in own if x]
        if (hook == "INPUT") == (side == "dst"):
            return mine_int + self.index.preferred[family]
        return [a for a in self.index.preferred[family] if a not in mine_int] + mine_int  # a peer, not itself

    def name_of(self, family: int, addr: int) -> str | None:
        """The stack host an address belongs to, for counterexamples."""
        if family == 4 and addr in self.host_at:
            return self.host_at[addr].name
        text = str(ipaddress.ip_address(addr) if family == 4 else ipaddress.IPv6Address(addr))
        return next((h for h, a in self.addresses.items() if text in (a.public, a.public6)), None)

    # --- verdict ---------------------------------------------------------------------------------

    def _port(self, family: int, p: Packet) -> PortSpec | None:
        if p.proto in (6, 17):
            return PortSpec("tcp" if p.proto == 6 else "udp", p.dport, p.dport)
        if p.proto == (1 if family == 4 else 58) and p.icmp == ECHO[family]:
            return PortSpec("icmp")
        return None

    def verdict(self, family: int, hook: str, p: Packet) -> tuple[bool, str]:
        if hook == "OUTPUT":
            return self._output(family, p)
        if p.proto == (1 if family == 4 else 58) and p.icmp == REDIRECT[family]:
            return False, "by design: ICMP redirects are dropped in every state, on every interface"
        if p.iface == "lo":
            return True, "by design: loopback"
        if p.state in ("ESTABLISHED", "RELATED"):
            return True, "by design: replies and errors about a connection (ESTABLISHED, RELATED)"
        if family == 6 and self.role.ipv6 and p.iface == self.public and p.proto == 58:
            if p.icmp in ND and p.hl == ND_HOP_LIMIT:
                return True, f"by design: IPv6 {ND[p.icmp]} on the public link"
            link_local = LL_INTERVAL[0] <= p.src < LL_INTERVAL[1]
            if p.icmp == RA and p.hl == ND_HOP_LIMIT and link_local:
                return True, "by design: IPv6 router advertisement from the gateway (link-local)"
            if p.icmp == MLD and p.hl == MLD_HOP_LIMIT and link_local:
                return True, "by design: IPv6 multicast listener query from the gateway (link-local)"
        if p.state == "INVALID":
            return False, "by design: INVALID is dropped"
        names: dict[str | None, Interface] = {self.public: "public", self.private: "private"}
        interface = names.get(p.iface) if p.iface else None
        port = self._port(family, p)
        if interface is None or port is None:
            return False, "default drop (no declaration opens this interface or protocol)"
        src = self._endpoint(family, p.src, interface)
        flow = decide(self.policy, src, self.host, port, interface, family)
        return (True, flow.why) if flow else (False, "default drop (no declaration admits it)")

    def _endpoint(self, family: int, addr: int, interface: Interface) -> Endpoint:
        host = self.host_at.get(addr) if family == 4 and interface == "private" else None
        if host is not None:
            return Endpoint("host", host.name)
        text = str(ipaddress.ip_address(addr) if family == 4 else ipaddress.IPv6Address(addr))
        return Endpoint("internet", "outsider", text if family == 4 else None, text if family == 6 else None)

    def _output(self, family: int, p: Packet) -> tuple[bool, str]:
        if not self.restricted:
            return True, "by design: egress open"
        if p.iface == "lo":
            return True, "by design: loopback"
        if p.state in ("ESTABLISHED", "RELATED"):
            return True, "by design: replies (ESTABLISHED, RELATED)"
        outside_vpc = family == 4 and not self.vpc[0] <= p.dst < self.vpc[1]
        if self.allowlist is None and self.public is not None and p.iface == self.public:
            return True, "egress: restricted lets new traffic out of the public interface"
        if self.allowlist is None and self.public is None and p.iface == self.private and outside_vpc:
            return True, "egress: restricted lets new traffic to the Internet out (through the NAT gateway)"
        if self.allowlist is not None and family == 6 and self.role.ipv6 and p.iface == self.public and p.proto == 58 \
                and p.icmp in SENT:
            return True, f"by design: IPv6 {SENT[p.icmp]} sent on the public link"
        interface: Interface | None = {self.public: "public", self.private: "private"}.get(p.iface)  # type: ignore[assignment]
        if self.public is None and interface == "private" and outside_vpc:
            interface = "public"  # a private droplet's Internet side: out of its one interface, through the NAT gateway
        dst = self.host_at.get(p.dst) if family == 4 and interface == "private" else None
        port = self._port(family, p)
        if port is not None:
            address = str(ipaddress.ip_address(p.dst) if family == 4 else ipaddress.IPv6Address(p.dst))
            why = egress_verdict(self.policy, self.host, address, dst, port, interface, family)
            if why is not None:
                return True, why
        return False, "egress restricted: default drop" if self.allowlist is None else "egress allowlist: default drop"
