"""The intent a host's rules must equal, written once: the compiled policy plus what every host admits by design.

By design (render.py explains each): ICMP and ICMPv6 redirects dropped in every state on every interface;
loopback; replies and the errors about a connection (ESTABLISHED,
RELATED); INVALID dropped; on the public interface of a role with `ipv6`, neighbour solicitations and
advertisements with hop limit 255, router advertisements from fe80::/10 with hop limit 255 and MLD queries from
fe80::/10 with hop limit 1, whatever their conntrack state. Every other packet (NEW or UNTRACKED) is what
`enclave.compiler.decide()` says, the function the plan and the lab use. Outgoing: open, or for
`egress: restricted` loopback, replies, anything out of the public interface, and on the private interface
exactly what the destination host accepts from this one.

Out of scope: FORWARD (ENCLAVE-FORWARD, what the host forwards to its containers). render.forward_rules derives
it line for line from ENCLAVE-INPUT's accepts, tests/test_verify.py checks that correspondence, and the lab
proves it with packets (tests/test_lab_redteam.py); the proofs here cover INPUT and OUTPUT.
"""

from __future__ import annotations

import ipaddress

from config.schema import PortSpec

from ..compiler import Addresses, Endpoint, Host, Interface, Policy, decide
from ..render import ICMPV6_ND, LINK_LOCAL, MLD_HOP_LIMIT, MLD_QUERY, ND_HOP_LIMIT
from .engine import Packet, Regions
from .parse import ICMP_TYPES, ICMPV6_TYPES

ECHO = {4: 8, 6: 128}
REDIRECT = {4: ICMP_TYPES["redirect"], 6: ICMPV6_TYPES["redirect"]}
LL = ipaddress.ip_network(LINK_LOCAL)
LL_INTERVAL = (int(LL.network_address), int(LL.broadcast_address) + 1)
ND = {ICMPV6_TYPES[name]: name for name in ICMPV6_ND if name != "router-advertisement"}
RA = ICMPV6_TYPES["router-advertisement"]
MLD = int(MLD_QUERY)


def _interval(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address) + 1


def as_int(text: str) -> int:
    return int(ipaddress.ip_address(text))


class AddressIndex:
    """The stack's addresses as integers, computed once for every host of a fleet."""

    def __init__(self, policy: Policy, addresses: dict[str, Addresses]) -> None:
        self.host_at: dict[int, Host] = {as_int(addresses[h.name].private): h for h in policy.hosts}
        outsiders = {4: ["192.0.2.10", "10.255.255.254"], 6: ["2001:db8:ff::10", "fe80::1"]}
        publics = {4: [a.public for a in addresses.values()], 6: [a.public6 for a in addresses.values() if a.public6]}
        self.preferred = {4: list(self.host_at) + [as_int(x) for x in outsiders[4] + publics[4]],
                          6: [as_int(x) for x in outsiders[6] + publics[6]]}


class HostIntent:
    """The intent for one host of a compiled policy with concrete addresses."""

    def __init__(self, policy: Policy, addresses: dict[str, Addresses], host: Host,
                 index: AddressIndex | None = None) -> None:
        self.policy, self.addresses, self.host = policy, addresses, host
        stack = policy.stack
        self.role = stack.roles[host.role]
        self.public, self.private = stack.interfaces.public, stack.interfaces.private
        self.restricted = self.role.egress == "restricted"
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
        if hook == "OUTPUT" and family == 4 and self.restricted:
            return self._role_regions()  # decide() sees a destination host only through its role
        return {}

    def interfaces(self) -> list[str]:
        return ["lo", self.public, self.private]

    def ports(self, hook: str) -> list[tuple[int, int]]:
        flows = self.policy.flows if hook == "OUTPUT" else self.policy.flows_to_role[self.host.role]
        return [(p.low, p.high) for f in flows for p in f.ports if p.proto != "icmp"]

    def icmp_types(self, family: int) -> list[int]:
        return [ECHO[family], REDIRECT[family]] + ([MLD, RA, *ND] if family == 6 else [])

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
        interface: Interface | None = {self.public: "public", self.private: "private"}.get(p.iface)  # type: ignore[assignment]
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
        if p.iface == self.public:
            return True, "egress: restricted lets new traffic out of the public interface"
        dst = self.host_at.get(p.dst) if family == 4 and p.iface == self.private else None
        port = self._port(family, p)
        if dst is not None and port is not None:
            flow = decide(self.policy, Endpoint("host", self.host.name), dst, port, "private", family)
            if flow is not None:
                return True, f"{flow.why} (what {dst.name} accepts from this host)"
        return False, "egress restricted: default drop"
