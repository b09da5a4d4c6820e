"""Flows + addresses -> per host: an iptables-restore file, an ip6tables-restore file and an ipset file.

Design (why it looks like this):
- enclave owns only its chains (ENCLAVE-INPUT, ENCLAVE-OUTPUT) and the built-in chains' policies. The files
  are loaded with `--noflush`, which replaces exactly the chains a file declares: Docker's, fail2ban's and
  other tools' chains survive. The push script makes sure INPUT/OUTPUT jump to ours first.
- Peers are matched through one ipset per source role, so a host's rule count depends on its own
  declarations, never on how many peers there are (scaling a role changes set members, not rules).
- Every ACCEPT carries a comment saying which declaration it comes from, so `iptables -vL` reads like the
  stack file, and its counters show what matched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# Set names live in config.names, where the schema refuses a stack whose names would collide.
from config.names import OPERATORS_SET as OPERATORS_SET, SET_NAME_MAX as SET_NAME_MAX, SET_PREFIX as SET_PREFIX
from config.names import set_name as set_name
from config.schema import Interfaces, PortSpec, StackConfig

from .compiler import Addresses, EgressFlow, Flow, Host, Policy
from .ipsets import landed_name
from .rulefiles import CHAIN_PREFIX as CHAIN_PREFIX, FORWARD_CHAIN as FORWARD_CHAIN, INPUT_CHAIN as INPUT_CHAIN
from .rulefiles import OUTPUT_CHAIN as OUTPUT_CHAIN
from .rulefiles import RuleFiles as RuleFiles

DEFAULT_HASHSIZE = 1024  # ipset's initial bucket count for hash sets

# ICMPv6 control traffic: what is accepted, where, and why (README "How the rules look" says it briefly).
#
# A role with `ipv6` has one IPv6 address, static, on its public interface; the VPC is IPv4 only, and a role
# without `ipv6` speaks IPv6 to nobody. So control traffic is accepted only on the public interface of a role
# with `ipv6`, and only in the shape a genuine on-link sender gives it (RFC 4861: hop limit 255 proves the
# packet was not forwarded, since a router decrements it; RAs and MLD queries come from a link-local address):
#   neighbour-solicitation, neighbour-advertisement (135, 136): resolving addresses on the link; without them
#     nobody can deliver a packet to the host's IPv6 address. Any source (a neighbour may ask from its global
#     address, a DAD probe comes from ::), hop limit 255.
#   router-advertisement (134): the public gateway announcing itself; only from fe80::/10 with hop limit 255.
#     Nowhere else: one RA on the private segment (from any resource in the VPC) or on a role without `ipv6`
#     would give the host an address and a default route via the sender.
#   MLD query (130): the router asking which multicast groups the host listens to. A multicast-snooping
#     switch that hears no answer stops delivering the solicited-node group that neighbour solicitations are
#     sent to, and IPv6 fails minutes later. Only from fe80::/10 with hop limit 1 (RFC 2710/3810).
# Not accepted anywhere:
#   router-solicitation (133): only routers answer it; the host is none.
#   redirect (137): a host here has one gateway per segment; a redirect only ever moves traffic to another
#     next hop, and a forged one diverts it through the sender.
#   MLD reports and done (131, 132, 143), node information, inverse ND, SEND, multicast router discovery:
#     for routers and protocols these hosts do not run.
#   Errors (destination-unreachable, packet-too-big, time-exceeded, parameter-problem): accepted only as
#     conntrack's RELATED, by the replies rule, i.e. when they are about a connection the host has. Path MTU
#     discovery works so (the packet-too-big quotes a packet of that connection); an error about nothing the
#     host sent is INVALID and dropped. A forged one about a real connection does what the genuine one does
#     (ends that attempt, or lowers that destination's path MTU, never under IPv6's 1280).
#   echo-request (128): only where the stack declares `icmp`; echo-reply (129): only as ESTABLISHED, answers to
#     the host's own pings.
# What remains: on the public link itself, any other on-link sender's RA looks exactly like the gateway's (a
# link-local source, hop limit 255) and is taken the same on a role with `ipv6`; telling them apart would
# need the gateway's link-local address pinned in the rule, or accept_ra=0 on hosts whose IPv6 is static.
# Conntrack does not track ND or MLD (they are neither new nor related: state INVALID), so these accepts come
# before the INVALID drop. OUTPUT needs no ICMPv6 rule: it is open, or (`egress: restricted`) open on the
# public interface, where the host's own solicitations, advertisements and MLD reports leave; out of the
# private interface, which carries no IPv6, they are dropped; errors the host sends are RELATED.
#
# ICMP(v4), accepted in INPUT only as follows, each for a reason:
#   echo-request (8): only where the stack declares `icmp` for that source, like any port.
#   Errors (destination-unreachable 3, time-exceeded 11, parameter-problem 12, and source-quench 4, which Linux
#     ignores since 3.x): only as conntrack's RELATED, i.e. quoting a connection of this host (the quoted
#     tuple must be one conntrack holds, else the error is INVALID and dropped). What a forged one can do is
#     what the genuine one does: fragmentation-needed lowers the path MTU of that one destination (the kernel
#     refuses an MTU under min_pmtu, 552), unreachable/time-exceeded end that one connection's attempt (TCP
#     treats them as soft errors for an established connection). A forger on the path could end the
#     connection with a RST just as well.
#   echo-reply (0), timestamp-reply (14), address-mask-reply (18): only as ESTABLISHED, answers to the host's own
#     requests (ping).
#   redirect (5): never, in no state, on no interface. conntrack files a redirect that quotes a tracked flow as
#     RELATED, and the kernel then moves that flow's route to the gateway it names: an on-link sender that
#     spoofs the gateway diverts the host's traffic through itself. The host has one gateway per segment and
#     nothing to learn from a redirect, so the drop comes before the replies rule (and before loopback), and
#     the host is also told not to act on one (`accept_redirects`/`secure_redirects` 0, set by apply.sh).
#   Everything else (router advertisement/solicitation, timestamp and address-mask requests, ...): default drop.
# ICMPv6 redirect (137) is dropped the same way, before the replies rule (conntrack does not track it: it would be
# INVALID anyway; the explicit drop states it and holds whatever conntrack makes of it).
ICMP_REDIRECT = {4: "redirect", 6: "redirect"}
# Published container ports (Docker, and any DNAT to a local bridge or VM). Docker turns a packet to a published
# port into forwarded traffic with a DNAT in nat PREROUTING: it never passes INPUT. Docker's documented place for
# a host policy is the filter chain DOCKER-USER (moby daemon/libnetwork/firewall_linux.go: created if missing,
# never flushed, its `FORWARD -j DOCKER-USER` jump re-inserted at position 1 on every daemon start), so
# ENCLAVE-FORWARD is hooked from there (apply.sh `jumps`) and admits exactly what ENCLAVE-INPUT admits, by the
# ORIGINAL destination port (`-m conntrack --ctstate DNAT --ctorigdstport`): the accept lines of INPUT, carried
# over one for one (forward_rules). It never accepts: an admitted flow RETURNs to DOCKER-USER and on to Docker's
# own chains, which still decide whether that port is published at all; everything else arriving on the public
# or private interface is dropped (replies, ESTABLISHED/RELATED, return first). Traffic from the containers
# themselves (their bridge) is not enclave's to judge here: it returns to Docker's chains.
LINK_LOCAL = "fe80::/10"
ND_HOP_LIMIT = 255
MLD_HOP_LIMIT = 1
MLD_QUERY = "130"  # ip6tables has no name for the MLD types
# The ND types accepted in INPUT (by their ip6tables names, as they appear in the rule files).
ICMPV6_ND = ("router-advertisement", "neighbour-solicitation", "neighbour-advertisement")


@dataclass(frozen=True)
class IpSet:
    name: str  # the base name (config.names); it lands as `landed`
    kind: str  # hash:ip (a role's private addresses) or hash:net (operator ranges)
    family: str  # inet or inet6
    members: tuple[str, ...]
    about: str

    @property
    def definition(self) -> str:
        """What follows the name in its `create` line."""
        return f"{self.kind} family {self.family}{_hashsize(self)}"

    @functools.cached_property
    def landed(self) -> str:
        """The name the set has on the host, and in the rules: `<name>.<generation>` (enclave.ipsets)."""
        return landed_name(self.name, self.definition, self.members)


# ICMPv6 a host with an egress allowlist still sends out of its public interface (a role with `ipv6` only): router
# solicitations, neighbour solicitations and advertisements (without them nobody resolves anybody), MLDv2
# reports (143: the switch keeps delivering the solicited-node group; see ICMPv6 at the top).
ICMPV6_SENT = ("router-solicitation", "neighbour-solicitation", "neighbour-advertisement", "143")


def _comment(text: str) -> str:
    # iptables comments are at most 255 bytes, written between double quotes: no `"` or `\` inside (descriptions
    # are printable ASCII without them, config.schema; the rest is enclave's own text).
    return '-m comment --comment "' + text.replace('"', "'").replace("\\", "/")[:250] + '"'


def about(why: str, what: str, description: str | None) -> str:
    """A rule's comment: the stack key, what it admits, and the entry's description if it has one."""
    return f"{why}: {what}" + (f" ({description})" if description else "")


def _port_match(port: PortSpec, family: int) -> str:
    if port.proto == "icmp":
        return "-p icmp -m icmp --icmp-type 8" if family == 4 else "-p ipv6-icmp -m icmp6 --icmpv6-type 128"
    ports = str(port.low) if port.low == port.high else f"{port.low}:{port.high}"
    return f"-p {port.proto} -m {port.proto} --dport {ports}"


class Renderer:
    """Renders every host of one policy for one set of addresses; set contents are computed once per role."""

    def __init__(self, policy: Policy, addresses: dict[str, Addresses], stack_name: str = "stack") -> None:
        self.policy = policy
        self.addresses = addresses
        self.stack_name = stack_name
        self._role_sets: dict[str, IpSet] = {}
        self._operator_sets: dict[int, IpSet] = {}
        # A set's text (and its generation, a hash of its members) is the same in every host that uses it;
        # render it once (a 5 000-host fleet would otherwise rebuild millions of `add` lines).
        self._set_texts: dict[str, str] = {}  # by set name: one content per name within a Renderer
        self._hosts_of_role: dict[str, list[str]] = {role: [] for role in policy.stack.roles}
        for h in policy.hosts:
            self._hosts_of_role[h.role].append(h.name)
        # Whose addresses the host being rendered uses: whole roles (through their sets) and single hosts.
        self._peer_roles: set[str] = set()
        self._peer_hosts: set[str] = set()
        # Hosts of a role mostly name the same peers: sort each distinct combination once, not once per host
        # (sorting ~5 000 names for each of 2 500 hosts took 4.5 s of a 5 000-host plan).
        self._peer_lists: dict[tuple[frozenset[str], frozenset[str]], tuple[str, ...]] = {}

    # ------------------------------------------------------------------------------------------- sets

    def role_set(self, role: str) -> IpSet:
        self._peer_roles.add(role)
        if role not in self._role_sets:
            members = tuple(self.addresses[name].private for name in self._hosts_of_role[role])
            self._role_sets[role] = IpSet(set_name(role), "hash:ip", "inet", members, f"private addresses of role {role}")
        return self._role_sets[role]

    def operators_set(self, family: int) -> IpSet:
        if family not in self._operator_sets:
            nets = tuple(str(n) for n in self.policy.stack.operators if n.version == family)
            self._operator_sets[family] = IpSet(OPERATORS_SET[family], "hash:net", "inet" if family == 4 else "inet6", nets,
                                                "operators")
        return self._operator_sets[family]

    # ------------------------------------------------------------------------------------------ rules

    def _source_match(self, flow: Flow, family: int, sets: dict[str, IpSet]) -> str | None:
        """The match for a flow's source in one family, or None if the flow cannot occur in it."""
        source = flow.source
        if source.kind == "role":
            if family == 6:
                return None
            s = self.role_set(source.name)
            sets[s.name] = s
            return f"-m set --match-set {s.landed} src"
        if source.kind == "host":
            if family == 6:
                return None
            self._peer_hosts.add(source.name)
            return f"-s {self.addresses[source.name].private}/32"
        if source.kind == "internet":
            return ""
        if source.kind == "operators":
            s = self.operators_set(family)
            if not s.members:
                return None
            sets[s.name] = s
            return f"-m set --match-set {s.landed} src"
        cidr = source.name
        return f"-s {cidr}" if (":" in cidr) == (family == 6) else None

    def _input_rules(self, host: Host, family: int, sets: dict[str, IpSet]) -> list[str]:
        stack = self.policy.stack
        role = stack.roles[host.role]
        interface = {"public": stack.public_interface(host.role), "private": stack.private_interface(host.role)}
        rules: list[str] = []
        # A packet a rule already admits needs no second rule: an entry written twice (or a role named in two
        # entries on one port) is rendered once, under the first declaration's comment.
        matched: set[tuple[str, str, str]] = set()
        for flow in self.policy.flows_to_role[host.role]:
            if family == 6 and (flow.interface == "private" or not role.ipv6):
                continue  # the VPC is IPv4 only; a role without ipv6 has no public IPv6 address
            iface = interface[flow.interface]
            if iface is None:
                continue  # a public source and a role without public networking: the schema refuses it
            match = self._source_match(flow, family, sets)
            if match is None:
                continue
            for port in flow.ports:
                if (iface, _port_match(port, family), match) in matched:
                    continue
                matched.add((iface, _port_match(port, family), match))
                words = [f"-A {INPUT_CHAIN} -i {iface}", _port_match(port, family), match]
                words.append(_comment(about(flow.why, f"{flow.source} -> {port}", flow.description)))
                rules.append(" ".join(w for w in words if w) + " -j ACCEPT")
        return rules

    def _output_rules(self, host: Host, family: int, sets: dict[str, IpSet]) -> list[str]:
        """Restricted egress: new connections only to the Internet, or to what peers accept.
        An allowlist: only to what peers accept, the listed entries and the essentials (enclave.compiler)."""
        stack = self.policy.stack
        private = stack.private_interface(host.role)
        public = stack.public_interface(host.role)
        allowlist = self.policy.egress.get(host.role)
        rules = [
            f"-A {OUTPUT_CHAIN} -o lo -j ACCEPT",
            f"-A {OUTPUT_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]
        if allowlist is None:
            rules += internet_egress(stack, host.role, family)
        elif family == 6 and stack.roles[host.role].ipv6 and public is not None:
            rules += [f"-A {OUTPUT_CHAIN} -o {public} -p ipv6-icmp -m icmp6 --icmpv6-type {kind} "
                      f"{_comment('ipv6 control sent on the public link')} -j ACCEPT" for kind in ICMPV6_SENT]
        if family == 4:
            sent: set[tuple[str, str]] = set()  # one rule per (port, destination set), as for input
            for flow in self.policy.flows_from_host(host):
                s = self.role_set(flow.role)
                sets[s.name] = s
                for port in flow.ports:
                    if (_port_match(port, 4), s.name) in sent:
                        continue
                    sent.add((_port_match(port, 4), s.name))
                    rules.append(
                        f"-A {OUTPUT_CHAIN} -o {private} {_port_match(port, 4)} -m set --match-set "
                        f"{s.landed} dst {_comment(about(flow.why, f'{flow.source} -> {flow.role} {port}', flow.description))} -j ACCEPT"
                    )
        if allowlist is None:
            rules.append(f"-A {OUTPUT_CHAIN} {_comment('egress restricted: default drop')} -j DROP")
            return rules
        done: set[tuple[str, str]] = set()
        for allowed in allowlist:
            for match in self._destination_matches(host, allowed, family):
                for port in allowed.ports:
                    if (match, _port_match(port, family)) in done:
                        continue
                    done.add((match, _port_match(port, family)))
                    comment = _comment(about(allowed.why, f"{host.role} -> {allowed.to} {port}", allowed.description))
                    words = [f"-A {OUTPUT_CHAIN}", match, _port_match(port, family), comment, "-j ACCEPT"]
                    rules.append(" ".join(w for w in words if w))
        rules.append(f"-A {OUTPUT_CHAIN} {_comment('egress allowlist: default drop')} -j DROP")
        return rules

    def _destination_matches(self, host: Host, allowed: EgressFlow, family: int) -> list[str]:
        """The matches for an allowlist entry's destination in one family ([] if it cannot occur in it)."""
        stack = self.policy.stack
        public, private = stack.public_interface(host.role), stack.private_interface(host.role)
        if allowed.kind in ("role", "all", "host"):
            # The schema refuses such an entry unless the destination's ingress admits this role on these ports,
            # so the rule for what peers admit (above) already lets it out: a second rule would never match.
            return []
        if allowed.interface == "public" and public is None:
            # a private droplet reaches the Internet through the NAT gateway on its one, VPC interface: there the
            # Internet is what lies outside the VPC range (IPv4 only: the VPC carries no IPv6)
            if family == 6:
                return []
            out = f"-o {private}" + (f" ! -d {stack.vpc_ip_range}" if allowed.kind == "internet" else "")
        else:
            out = "" if allowed.interface is None else f"-o {public if allowed.interface == 'public' else private}"
        if allowed.kind == "internet":
            return [out]
        return [f"{out} -d {allowed.to}".strip()] if (":" in allowed.to) == (family == 6) else []  # one family

    def _table(self, host: Host, family: int, sets: dict[str, IpSet]) -> str:
        role = self.policy.stack.roles[host.role]
        restricted = role.egress != "open"
        title = f"enclave {self.stack_name} {host.name} (role {host.role}), IPv{family}"
        body = self._input_rules(host, family, sets)
        output = self._output_rules(host, family, sets) if restricted else []
        ipv6_public = self.policy.stack.public_interface(host.role) if role.ipv6 else None
        return filter_table(title, family, body, output, self.policy.stack.log_drops, ipv6_public=ipv6_public,
                            interfaces=self._interfaces_of(host.role), published=body)

    def _interfaces_of(self, role: str) -> Interfaces:
        """The role's own interfaces, for the forward chain's drops and the kernel settings: a private droplet
        (`public: false`) has one, its private one (interfaces.privateOnly), which stands for both here."""
        stack = self.policy.stack
        private = stack.private_interface(role)
        return Interfaces.model_construct(public=stack.public_interface(role) or private, private=private,
                                          private_only=stack.interfaces.private_only)

    # ---------------------------------------------------------------------------------------- public

    def render(self, host: Host) -> RuleFiles:
        sets: dict[str, IpSet] = {}
        self._peer_roles, self._peer_hosts = set(), set()
        ipv4 = self._table(host, 4, sets)
        ipv6 = self._table(host, 6, sets)
        ordered = [sets[k] for k in sorted(sets)]
        ipsets = "".join(self._set_text(s) for s in ordered)
        return RuleFiles(host.name, ipv4, ipv6, ipsets, tuple(s.landed for s in ordered), self._peer_list())

    def _peer_list(self) -> tuple[str, ...]:
        key = (frozenset(self._peer_roles), frozenset(self._peer_hosts))
        if key not in self._peer_lists:
            names = set(self._peer_hosts).union(*(self._hosts_of_role[r] for r in self._peer_roles))
            self._peer_lists[key] = tuple(sorted(names))
        return self._peer_lists[key]

    def _set_text(self, s: IpSet) -> str:
        if s.name not in self._set_texts:
            self._set_texts[s.name] = render_ipsets([s])
        return self._set_texts[s.name]

    def render_all(self) -> dict[str, RuleFiles]:
        return {h.name: self.render(h) for h in self.policy.hosts}


def internet_egress(stack: StackConfig, role: str, family: int) -> list[str]:
    """The restricted-egress rule that lets a host's new connections to the Internet out.

    With public networking, that is everything leaving the public interface. A droplet without it has one
    interface, the VPC's, and reaches the Internet through the NAT gateway on it: there, the Internet is every
    destination outside the VPC range (the VPC carries no IPv6, so IPv6 has nowhere to go)."""
    public = stack.public_interface(role)
    if public is not None:
        return [f"-A {OUTPUT_CHAIN} -o {public} {_comment('new traffic to the Internet')} -j ACCEPT"]
    if family == 6:
        return []
    return [f"-A {OUTPUT_CHAIN} -o {stack.private_interface(role)} ! -d {stack.vpc_ip_range} "
            f"{_comment('new traffic to the Internet, through the NAT gateway')} -j ACCEPT"]


def icmpv6_control(ipv6_public: str | None) -> list[str]:
    """The ICMPv6 control traffic a host accepts (see ICMPv6 at the top): none without a public IPv6 address."""
    if ipv6_public is None:
        return []
    on_link = f"-i {ipv6_public} -p ipv6-icmp -m icmp6 --icmpv6-type"
    return [
        f"-A {INPUT_CHAIN} {on_link} neighbour-solicitation -m hl --hl-eq {ND_HOP_LIMIT} "
        f"{_comment('ipv6 control: neighbour solicitation, on-link')} -j ACCEPT",
        f"-A {INPUT_CHAIN} {on_link} neighbour-advertisement -m hl --hl-eq {ND_HOP_LIMIT} "
        f"{_comment('ipv6 control: neighbour advertisement, on-link')} -j ACCEPT",
        f"-A {INPUT_CHAIN} -s {LINK_LOCAL} {on_link} router-advertisement -m hl --hl-eq {ND_HOP_LIMIT} "
        f"{_comment('ipv6 control: router advertisement from the public gateway (link-local)')} -j ACCEPT",
        f"-A {INPUT_CHAIN} -s {LINK_LOCAL} {on_link} {MLD_QUERY} -m hl --hl-eq {MLD_HOP_LIMIT} "
        f"{_comment('ipv6 control: multicast listener query from the public gateway (link-local)')} -j ACCEPT",
    ]


def host_sysctls(family: int, interfaces: Interfaces) -> list[str]:
    """Kernel settings the host takes with its rules, as `# sysctl KEY=VALUE` comment lines of rules.v4 (apply.sh
    applies these, and only keys of this shape; iptables-restore and the proofs skip comments).

    Strict reverse-path filtering on the private interface: a packet arriving there is taken only if the host
    would route its source back out of that interface. A VPC neighbour spoofing an Internet address (say, the
    resolver's, to answer the host's DNS query: conntrack ignores the interface, so a forged UDP answer is
    ESTABLISHED) is dropped before conntrack; the VPC's own addresses are routed on that interface and pass. The
    kernel takes the larger of `all` and the interface's value (stock images leave `all` at 0). It does not
    stop a neighbour claiming another VPC address (threat model); accept_redirects/secure_redirects (every
    interface) are apply.sh's own, unconditional.
    """
    return [f"# sysctl net.ipv4.conf.{interfaces.private}.rp_filter=1"] if family == 4 else []


def forward_rules(accepts: list[str], interfaces: Interfaces, log_drops: bool) -> list[str]:
    """ENCLAVE-FORWARD (see "Published container ports" at the top): INPUT's accept lines carried over one for one,
    matched on the original destination port of a DNATed flow; replies return; the rest from outside drops."""
    rules = [f"-A {FORWARD_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"]
    for line in accepts:
        words = line.split(" ")
        if words[:2] != ["-A", INPUT_CHAIN] or words[-2:] != ["-j", "ACCEPT"] or "-i" not in words:
            raise ValueError(f"an accept line forward_rules cannot carry over: {line}")
        proto = words[words.index("-p") + 1] if "-p" in words else ""
        if proto in ("icmp", "ipv6-icmp"):
            continue  # no runtime publishes ICMP: an echo request to the host is the host's own
        at = next((i for i in range(len(words) - 3) if words[i] == "-m" and words[i + 1] == proto
                   and words[i + 2] == "--dport"), None)
        if proto not in ("tcp", "udp") or at is None:
            raise ValueError(f"an accept line forward_rules cannot carry over (no -p tcp/udp ... --dport): {line}")
        words[at:at + 3] = ["-m", "conntrack", "--ctstate", "DNAT", "--ctorigdstport"]
        words[1], words[-1] = FORWARD_CHAIN, "RETURN"
        rules.append(" ".join(words))
    for iface in dict.fromkeys((interfaces.public, interfaces.private)):
        if log_drops:
            rules.append(f'-A {FORWARD_CHAIN} -i {iface} -m limit --limit 6/min --limit-burst 10 -j LOG '
                         f'--log-prefix "enclave-drop: "')
        rules.append(f"-A {FORWARD_CHAIN} -i {iface} -j DROP")
    return rules


def filter_table(title: str, family: int, accepts: list[str], output: list[str], log_drops: bool,
                 *, ipv6_public: str | None = None, interfaces: Interfaces, published: list[str] | None) -> str:
    """The frame every enclave table shares: policies, redirect drop, loopback, replies, ICMPv6 control, default
    drop; and ENCLAVE-FORWARD, which admits `published` (accept lines of `accepts`) to the host's containers.

    ipv6_public: the public interface of a role with `ipv6` (it accepts ICMPv6 control traffic there), else None.
    published: None for the baseline, which publishes nothing and leaves the kernel settings to the first push
    (its user data is capped at 64 KiB).
    """
    proto = "-p icmp -m icmp --icmp-type" if family == 4 else "-p ipv6-icmp -m icmp6 --icmpv6-type"
    lines = [
        f"# {title}. Generated: edit the stack file, not this.",
        *(host_sysctls(family, interfaces) if published is not None else []),
        "*filter",
        ":INPUT DROP [0:0]",
        ":FORWARD DROP [0:0]",
        f":OUTPUT {'DROP' if output else 'ACCEPT'} [0:0]",
        f":{INPUT_CHAIN} - [0:0]",
        f":{OUTPUT_CHAIN} - [0:0]",
        f":{FORWARD_CHAIN} - [0:0]",
        # in every state, on every interface (see ICMP at the top): before the replies rule, which takes RELATED
        f"-A {INPUT_CHAIN} {proto} {ICMP_REDIRECT[family]} -j DROP",
        f"-A {INPUT_CHAIN} -i lo -j ACCEPT",
        # replies, and the ICMP(v6) errors about a connection of this host (conntrack's RELATED)
        f"-A {INPUT_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    if family == 6:
        lines += icmpv6_control(ipv6_public)  # before the INVALID drop: conntrack does not track ND or MLD
    lines.append(f"-A {INPUT_CHAIN} -m conntrack --ctstate INVALID -j DROP")
    lines += accepts
    if log_drops:
        lines.append(f'-A {INPUT_CHAIN} -m limit --limit 6/min --limit-burst 10 -j LOG --log-prefix "enclave-drop: "')
    lines.append(f"-A {INPUT_CHAIN} {_comment('default drop')} -j DROP")
    return "\n".join(lines + output + forward_rules(published or [], interfaces, log_drops) + ["COMMIT", ""])


def baseline_files(stack: StackConfig, role: str) -> RuleFiles:
    """What a droplet of `role` boots with, before its first push: closed, but reachable for that push.

    SSH on the private interface from the VPC range (the bastion's address is not known when the droplet is
    created), and on the public interface from operators for bastions (or every host without bastions).
    Depends on no peer, so it never changes when the fleet does, and never forces a droplet replacement.
    Publishes nothing: until the first push, what arrives from outside for a container port is dropped (and the
    user data, capped at 64 KiB, does not carry every operator's line twice); the kernel settings come with it.
    """
    public_ssh = stack.roles[role].bastion or not stack.bastion_roles()  # never a private role: it has bastions
    tables = []
    for family in (4, 6):
        accepts = []
        if family == 4:
            accepts.append(
                f"-A {INPUT_CHAIN} -i {stack.private_interface(role)} -s {stack.vpc_ip_range} -p tcp -m tcp --dport 22 "
                f"{_comment('baseline: ssh from the VPC until the first push')} -j ACCEPT"
            )
        if public_ssh:
            accepts += [
                f"-A {INPUT_CHAIN} -i {stack.interfaces.public} -s {net} -p tcp -m tcp --dport 22 "
                f"{_comment('baseline: ssh from operators')} -j ACCEPT"
                for net in stack.operators
                if net.version == family
            ]
        ipv6_public = stack.public_interface(role) if stack.roles[role].ipv6 else None
        tables.append(filter_table(f"enclave baseline, role {role}, IPv{family}", family, accepts, [],
                                   stack.log_drops, ipv6_public=ipv6_public, interfaces=stack.interfaces,
                                   published=None))
    return RuleFiles(f"baseline-{role}", tables[0], tables[1], "", ())


def render_ipsets(sets: list[IpSet]) -> str:
    """The `ipset restore` file as it lands on the host: per set, `create` and its `add` lines, under the set's
    generation name (a hash of its members). A push creates the sets that do not exist yet beside the live ones;
    the rules then switch to them in one transaction (enclave.push, "one change at a time")."""
    lines = []
    for s in sets:
        lines.append(f"create {s.landed} {s.definition}")
        lines += [f"add {s.landed} {m}" for m in s.members]
    return "\n".join(lines) + ("\n" if lines else "")


def _hashsize(s: IpSet) -> str:
    """A large set sized for its members up front.

    ipset starts a hash at 1 024 buckets and rehashes it over and over while a restore fills it: sized up front,
    10 000 members load in 28 ms instead of 49 ms. Sets within the default render as before.
    """
    if not s.kind.startswith("hash:") or len(s.members) <= DEFAULT_HASHSIZE:
        return ""
    return f" hashsize {1 << (len(s.members) - 1).bit_length()}"
