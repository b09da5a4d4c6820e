"""The lab's network: namespaces, the two bridges, every interface's addresses, and the permanent neighbour
entries that keep the kernel's shared neighbour table out of every probe's verdict."""

from __future__ import annotations

from .base import NAT, LabBase
from .machine import LabError, LabUnavailable, _run, _run_all
from .nat import nat_rules
from .probe import AddressKind, outside_targets

def mac(index: int, bridge: str) -> str:
    """A lab interface's MAC address: fixed, so every namespace can be given its neighbours' in advance."""
    return f"02:00:{1 if bridge == 'public' else 2:02x}:{index >> 16 & 255:02x}:{index >> 8 & 255:02x}:{index & 255:02x}"



class Topology(LabBase):
    """Building the lab's network, and what each namespace must know of its neighbours."""

    # ----------------------------------------------------------------------------------- network

    def _build_network(self) -> None:
        rid = self.run_id
        pub, priv = self.interfaces.public, self.interfaces.private
        try:
            _run(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in self.namespaces))
        except LabError as exc:
            raise LabUnavailable(
                f"{exc}; this machine does not let root create network namespaces (a container without "
                "CAP_SYS_ADMIN?): run the lab on a VM or a full host, or in a container started with --privileged"
            ) from None
        # Before any interface exists: no duplicate address detection (addresses usable at once); ping sockets
        # (ICMP echo without raw sockets) for every group, in the lab's namespaces only.
        # IPv6 only on the interfaces that have an IPv6 address (the public ones of `ipv6` roles and the
        # Internet's): every other one would send multicast listener reports, and each report costs an entry in
        # the kernel's neighbour table that every namespace on this machine shares.
        sysctls = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                   "net.ipv6.conf.default.disable_ipv6=1", "net.ipv4.ping_group_range=0 2147483647"]
        _run_all([(["ip", "netns", "exec", ns, "sysctl", "-qw", *sysctls], None) for ns in self.namespaces[1:]])
        with_ipv6 = [h.name for h in self.hosts if self.addresses[h.name].public6]
        with_ipv6 += [e.name for e in (self.others.internet, self.others.operator) if e.address6]

        fabric = [
            "link add public type bridge mcast_snooping 0",
            "link add private type bridge mcast_snooping 0",
            "link set public up",
            "link set private up",
        ]
        per_ns: dict[str, list[str]] = {}

        def plug(index: int, name: str, iface: str, bridge: str, addresses: list[str]) -> None:
            end = f"{rid}{index}{'u' if bridge == 'public' else 'v'}"  # <= 15 chars, run id for leak checks
            ns = self.namespace(name)
            fabric.append(f"link add {end} type veth peer name {iface} netns {ns}")
            fabric.append(f"link set {end} master {bridge} up")
            lines = per_ns.setdefault(ns, ["link set lo up"])
            lines.append(f"link set {iface} address {mac(index, bridge)}")
            for address in addresses:
                lines.append(f"address add {address} dev {iface}" + (" nodad" if ":" in address else ""))
            lines.append(f"link set {iface} up")
            if bridge == "public":  # on-link defaults: every public range shares one segment, no router
                lines += [f"route add default dev {iface}"] + (
                    [f"route add ::/0 dev {iface}"] if any(":" in a for a in addresses) else []
                )

        stack = self.stack.config
        prefix = stack.vpc_ip_range.prefixlen
        for i, h in enumerate(self.hosts):
            a = self.addresses[h.name]
            if a.public is not None:
                plug(i, h.name, pub, "public", [f"{a.public}/32"] + ([f"{a.public6}/128"] if a.public6 else []))
            # a private droplet's one interface is its private one, named interfaces.privateOnly (eth0)
            plug(i, h.name, stack.private_interface(h.role), "private", [f"{a.private}/{prefix}"])
            if a.public is None and self.nat is not None:  # the NAT gateway is the VPC's default route
                per_ns[self.namespace(h.name)].append(f"route add default via {self.nat.private}")
        n = len(self.hosts)
        for j, endpoint in enumerate((self.others.internet, self.others.operator)):
            addrs = ([f"{endpoint.address}/32"] if endpoint.address else []) + (
                [f"{endpoint.address6}/128"] if endpoint.address6 else []
            )
            if endpoint is self.others.internet:  # it also answers inside every CIDR a test sends to
                addrs += [f"{a}/32" for a in sorted(set(outside_targets(self.policy, self.others).values()))
                          if a != endpoint.address]
            plug(n + j, endpoint.name, pub, "public", addrs)
        plug(n + 2, "neighbor", priv, "private", [f"{self.others.neighbor.address}/{prefix}"])
        if self.nat is not None:
            plug(n + 3, NAT, pub, "public", [f"{self.nat.public}/32"])
            plug(n + 3, NAT, priv, "private", [f"{self.nat.private}/{prefix}"])
        for name, entries in self.neighbour_entries().items():
            per_ns[self.namespace(name)] += [f"neigh replace {address} lladdr {lladdr} dev {iface} nud permanent"
                                             for iface, address, lladdr in sorted(entries)]

        _run(["ip", "-n", self.namespace("fabric"), "-batch", "-"], input="\n".join(fabric) + "\n",
             timeout=60 + len(fabric) * 0.05)
        _run_all([(self.in_ns(name, ["sysctl", "-qw", f"net.ipv6.conf.{pub}.disable_ipv6=0"]), None)
                  for name in with_ipv6])
        _run_all([(["ip", "-n", ns, "-batch", "-"], "\n".join(lines) + "\n") for ns, lines in per_ns.items()])
        if self.nat is not None:
            _run(self.in_ns(NAT, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
            _run(self.in_ns(NAT, ["iptables-restore"]), input=nat_rules(stack, pub, priv))
        internet = self.others.internet.address
        for address in sorted(set(outside_targets(self.policy, self.others).values()) - {internet}):
            # A test CIDR's address is the Internet's too; its listeners are bound to any address, and a UDP
            # answer would leave from the primary one, which the prober's conntrack does not know: the Internet
            # DNATs the address to its own, so conntrack answers from the address that was asked.
            _run(self.in_ns("internet", ["iptables", "-t", "nat", "-A", "PREROUTING", "-d", f"{address}/32",
                                         "-j", "DNAT", "--to-destination", str(internet)]))
        if self.starved:  # the injected fault: these namespaces give up on every neighbour they do not know
            knobs = [f"net.ipv{v}.neigh.{iface}.{k}=0" for v in (4, 6) for iface in (pub, priv)
                     for k in ("mcast_solicit", "ucast_solicit", "app_solicit")]
            for name in sorted(self.starved):
                ifaces = {"internet": [pub], "operator": [pub], "neighbor": [priv]}.get(name) or self._host_interfaces(name)
                _run(self.in_ns(name, ["sysctl", "-qew", *(k for k in knobs if k.split(".")[3] in ifaces)]))

    # ------------------------------------------------------------------------------ neighbours

    def _host_interfaces(self, host: str) -> list[str]:
        """A host's interfaces: public and private, or only the private one (interfaces.privateOnly)."""
        role = self.policy.host_by_name[host].role
        public = self.stack.config.public_interface(role)
        return [*([public] if public else []), self.stack.config.private_interface(role)]

    def link(self, name: str, kind: AddressKind) -> tuple[str, str, str] | None:
        """(interface, address, MAC) by which `name` (a host, an outsider or the NAT gateway) sends and receives
        on `kind`."""
        pub, priv = self.interfaces.public, self.interfaces.private
        names = [h.name for h in self.hosts]
        n = len(names)
        if name in self.addresses:
            a = self.addresses[name]
            index = self._index[name]
            address = {"private": a.private, "public": a.public, "public6": a.public6}[kind]
            role = self.policy.host_by_name[name].role
            iface, bridge = ((self.stack.config.private_interface(role), "private") if kind == "private"
                             else (pub, "public"))
        elif name == NAT:
            if self.nat is None or kind == "public6":
                return None
            index, iface, bridge = n + 3, (priv if kind == "private" else pub), kind
            address = self.nat.private if kind == "private" else self.nat.public
        elif name == "neighbor":
            if kind != "private":
                return None
            index, address, iface, bridge = n + 2, self.others.neighbor.address, priv, "private"
        elif name not in ("internet", "operator"):  # a CIDR a test sends to: the Internet answers there
            address = outside_targets(self.policy, self.others).get(name)
            if kind != "public" or address is None:
                return None
            index, iface, bridge = n, pub, "public"
        else:
            endpoint = self.others.internet if name == "internet" else self.others.operator
            if kind == "private":
                return None
            index, iface, bridge = (n if name == "internet" else n + 1), pub, "public"
            address = endpoint.address if kind == "public" else endpoint.address6
        return (iface, address, mac(index, bridge)) if address else None

    @property
    def _index(self) -> dict[str, int]:
        cached: dict[str, int] | None = getattr(self, "_index_cache", None)
        if cached is None:
            cached = {h.name: i for i, h in enumerate(self.hosts)}
            self._index_cache = cached
        return cached

    def neighbour_pairs(self) -> set[tuple[str, str, AddressKind]]:
        """(a, b, kind): a and b exchange packets over `kind`: every probe (both ways: the answer comes back),
        the operator with every host's public address and each bastion with every host's private one (the
        pushes, direct or through ProxyJump)."""
        pairs: set[tuple[str, str, AddressKind]] = {(p.source.name, p.target.host, p.target.kind)
                                                    for p in self.probe_set.probes}
        bastions = [h.name for h in self.policy.bastion_hosts()]
        for h in self.hosts:
            if self.addresses[h.name].public is not None:
                pairs.add(("operator", h.name, "public"))
            elif self.nat is not None:  # its default gateway
                pairs.add((h.name, NAT, "private"))
            pairs.update((b, h.name, "private") for b in bastions if b != h.name)
        if self.nat is not None:  # the gateway's egress side: whom the private hosts reach on the Internet
            pairs.update((NAT, outsider, "public") for outsider in ("internet", "operator"))
        return pairs

    def neighbour_entries(self) -> dict[str, set[tuple[str, str, str]]]:
        """The permanent IPv4 neighbour entries each namespace gets: (interface, address, MAC).

        The kernel's neighbour table is shared by every namespace on the machine and holds gc_thresh3 (1 024)
        dynamic entries, a setting only the machine's own namespace has; a lab of H hosts would need about
        2·H·(H+3). Permanent entries do not count against it (the kernel exempts them from its garbage
        collector's limit), so the lab writes what each namespace needs inside that namespace and never relies
        on the shared table. IPv6 keeps neighbour discovery: proving that the rules let it through is part
        of the lab's job (and the IPv6 addresses are few).
        """
        entries: dict[str, set[tuple[str, str, str]]] = {}
        for a, b, kind in self.neighbour_pairs():
            if kind == "public6":
                continue
            la, lb = self.link(a, kind), self.link(b, kind)
            if la is None or lb is None:
                continue
            if a not in self.starved:
                entries.setdefault(a, set()).add((la[0], lb[1], lb[2]))
            owner = b if b in self.addresses or b in ("internet", "operator", "neighbor", NAT) else "internet"  # a test CIDR
            if owner not in self.starved:
                entries.setdefault(owner, set()).add((lb[0], la[1], la[2]))
        return entries
