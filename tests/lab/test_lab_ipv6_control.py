"""ICMPv6 control traffic in the lab, rogue router advertisements first: real RAs on the lab's segments,
real kernels, real ip6tables.

The finding (issue 12): one RA from the `neighbor` on the private segment gave a role without IPv6 a global
address and a default route via the neighbour. Here every kind of RA is sent from inside the lab, by a small
raw-socket sender run in an outsider's namespace, to the all-nodes group of a segment, and each host is
checked the way an operator would check it: `ip -6 addr` and `ip -6 route` in its namespace.

For the checks to mean anything the hosts' kernels must act on the RAs that reach them: each host namespace
gets accept_ra=2 on both interfaces (take RAs even if forwarding were on; a droplet's kernel takes them with
its default accept_ra=1), set INSIDE the host namespaces only. A counting rule in each host's mangle
PREROUTING (before the filter table) shows that an RA reached the host, so a dropped RA cannot pass for one
that got lost on the way. A control test pushes the old rule (RA accepted anywhere with hop limit 255) and
sees the neighbour's RA take effect, so the test fails when the rules do.

ICMPv6 errors are accepted only as conntrack's RELATED: a packet-too-big about a datagram the host sent still
lowers its path MTU, and the same error is dropped once RELATED is taken out of the rules (the control).

dev with haproxy-www on IPv6: haproxy-www-1 is the host with IPv6, mysql-1 (and the others) have none.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from config.stackfile import Stack
from enclave.lab.lab import Lab

from ..conftest import pushed_lab, send_one
from .test_lab import _unavailable

pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=f"lab unavailable: {_unavailable()}")

WITH_IPV6 = "haproxy-www-1"
WITHOUT_IPV6 = "mysql-1"
PREFIX = "2001:db8:aa::/64"  # what the RAs announce (documentation range, inside the lab only)
ALL_NODES = "ff02::1"
INTERFACES = ("eth0", "eth1")  # dev's public, private

# Runs in an outsider's namespace: one router advertisement (RFC 4861 4.2) with one prefix information option,
# to `dest` out of `iface`. The kernel fills in the ICMPv6 checksum of a raw ICMPv6 socket. source "auto" lets
# the kernel pick the interface's link-local address (what a router uses); otherwise the given address.
RA_SENDER = r"""
import ipaddress, socket, struct, sys
iface, source, dest, hops, prefix, lifetime = sys.argv[1:7]
index = socket.if_nametoindex(iface)
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, int(hops))
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, int(hops))
if source != "auto":
    s.bind((source, 0, 0, 0))
net = ipaddress.IPv6Network(prefix)
# type 134, code 0, checksum, current hop limit 64, no flags, router lifetime, reachable time, retrans timer
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, int(lifetime), 0, 0)
# prefix information: type 3, length 4 (x 8 bytes), prefix length, on-link + autonomous, valid and
# preferred lifetimes, reserved, prefix
pio = struct.pack("!BBBBIII", 3, 4, net.prefixlen, 0xC0, 3600, 1800, 0) + net.network_address.packed
s.sendto(ra + pio, (dest, 0, 0, index))
"""

# Counts RAs arriving on an interface, before the filter table decides (no target: it only counts).
SEEN_RULE = "-p ipv6-icmp -m icmp6 --icmpv6-type router-advertisement -m comment --comment test-ra-seen"



@pytest.fixture(scope="module")
def lab(run_ids: list[str], dev6: Stack) -> Iterator[Lab]:
    with pushed_lab(dev6, run_ids) as lab:
        take_ras(lab)
        yield lab


def take_ras(lab: Lab) -> None:
    """Hosts whose kernels act on every RA that reaches them, and count the RAs that reach each interface.

    The lab turns IPv6 off on interfaces that carry no IPv6 address (their multicast reports would fill the
    kernel's shared neighbour table at size); a droplet has link-local IPv6 on both interfaces, so it is turned
    back on here, on every host and sender interface of this small lab, before anything is sent.
    """
    for name in [*lab.files, "neighbor", "internet"]:
        lab.run(name, ["sysctl", "-qw", *(f"net.ipv6.conf.{i}.disable_ipv6=0" for i in INTERFACES
                                          if name not in ("neighbor", "internet") or i == segment_iface(lab, name))],
                check=True)
    for host in lab.files:
        sysctls = [f"net.ipv6.conf.{i}.{key}" for i in INTERFACES for key in ("accept_ra=2", "autoconf=1",
                                                                               "accept_ra_defrtr=1")]
        lab.run(host, ["sysctl", "-qw", *sysctls], check=True)
        for iface in INTERFACES:
            lab.console(host, f"ip6tables -w -t mangle -A PREROUTING -i {iface} {SEEN_RULE}\n")


@pytest.fixture
def clean(lab: Lab) -> Iterator[Lab]:
    """Every test starts and ends with no RA-learned state on any host."""
    forget_learned(lab)
    yield lab
    forget_learned(lab)


def forget_learned(lab: Lab) -> None:
    for host in lab.files:
        for iface in INTERFACES:
            lab.run(host, ["ip", "-6", "addr", "flush", "dev", iface, "scope", "global", "dynamic"], check=True)
        lab.run(host, ["ip", "-6", "route", "flush", "proto", "ra"], check=True)
        assert learned(lab, host) == [], host


def learned(lab: Lab, host: str) -> list[str]:
    """What RAs gave the host: addresses from stateless autoconfiguration, routes from router advertisements."""
    addrs = lab.run(host, ["ip", "-6", "-o", "addr", "show", "scope", "global", "dynamic"], check=True).stdout
    routes = lab.run(host, ["ip", "-6", "route", "show", "proto", "ra"], check=True).stdout
    return [" ".join(line.split()) for line in (addrs + routes).splitlines() if line.strip()]


def seen(lab: Lab, host: str) -> dict[str, int]:
    """RAs that reached each interface of the host (the mangle counting rules)."""
    listing = lab.run(host, ["ip6tables", "-w", "-t", "mangle", "-vnxL", "PREROUTING"], check=True).stdout
    counts = {}
    for line in listing.splitlines():
        words = line.split()
        if "test-ra-seen" in line:
            (iface,) = [w for w in words if w in INTERFACES]  # the rule's `in` column
            counts[iface] = int(words[0])
    assert set(counts) == set(INTERFACES), listing
    return counts


def ra_rule_counter(lab: Lab, host: str) -> int:
    """Packets accepted by the host's router-advertisement rule in ENCLAVE-INPUT."""
    listing = lab.run(host, ["ip6tables", "-w", "-vnxL", "ENCLAVE-INPUT"], check=True).stdout
    (line,) = [line for line in listing.splitlines() if "ipv6-icmptype 134" in line and "ACCEPT" in line]
    return int(line.split()[0])


def send_ra(lab: Lab, sender: str, iface: str, *, source: str = "auto", hops: int = 255, lifetime: int = 1800,
            reaching: tuple[str, ...]) -> None:
    """One RA from `sender` to all nodes of its segment; returns once every host in `reaching` got it."""
    iface_on = segment_iface(lab, sender)
    before = {host: seen(lab, host) for host in reaching}
    lab.run(sender, [sys.executable, "-c", RA_SENDER, iface, source, ALL_NODES, str(hops), PREFIX, str(lifetime)],
            check=True)
    deadline = time.monotonic() + 10
    waiting = list(reaching)
    while waiting and time.monotonic() < deadline:
        waiting = [h for h in waiting if seen(lab, h)[iface_on] <= before[h][iface_on]]
        time.sleep(0.05)
    assert not waiting, f"the RA from {sender} never reached {waiting}"
    time.sleep(0.3)  # the kernel acts on an RA as it receives it; leave it a moment past the counter


def segment_iface(lab: Lab, sender: str) -> str:
    """The host's interface on the sender's segment: `neighbor` is on the private one, the others public."""
    return lab.interfaces.private if sender == "neighbor" else lab.interfaces.public


def link_local(lab: Lab, name: str, iface: str) -> str:
    out = lab.run(name, ["ip", "-6", "-o", "addr", "show", "dev", iface, "scope", "link"], check=True).stdout
    return out.split()[3].split("/")[0]


# ----------------------------------------------------------------------------------------------- tests


def test_a_rogue_ra_from_the_neighbor_on_the_private_segment_changes_no_host(clean: Lab) -> None:
    lab = clean
    hosts = tuple(lab.files)
    accepted = ra_rule_counter(lab, WITH_IPV6)
    send_ra(lab, "neighbor", "eth1", reaching=hosts)  # link-local source, hop limit 255: a well-formed RA
    assert {host: learned(lab, host) for host in hosts} == {host: [] for host in hosts}
    assert ra_rule_counter(lab, WITH_IPV6) == accepted  # not even the IPv6 role takes it: wrong interface


def test_an_ra_on_the_public_segment_is_taken_only_by_the_role_with_ipv6(clean: Lab) -> None:
    """The public gateway's RA (link-local source, hop limit 255): haproxy-www-1 (ipv6) takes its prefix and
    default route; mysql-1 and the other roles without IPv6 receive the same packet and take nothing.
    (Another sender on the public link would look the same to haproxy-www-1: see ICMPv6 in render.py.)"""
    lab = clean
    hosts = tuple(lab.files)
    accepted = ra_rule_counter(lab, WITH_IPV6)
    send_ra(lab, "internet", "eth0", reaching=hosts)
    gateway = link_local(lab, "internet", "eth0")
    got = learned(lab, WITH_IPV6)
    assert any(" eth0 inet6 2001:db8:aa:" in line for line in got), got
    assert f"default via {gateway} dev eth0 " in " ".join(got), got
    assert ra_rule_counter(lab, WITH_IPV6) == accepted + 1
    assert {h: learned(lab, h) for h in hosts if h != WITH_IPV6} == {h: [] for h in hosts if h != WITH_IPV6}
    # IPv6 service from the Internet still works, with the gateway's route in place
    outcome = send_one(lab, "internet", WITH_IPV6, "public6", "tcp/80")
    assert outcome.passed, outcome.describe()


@pytest.mark.parametrize(("why", "source", "hops"), [
    ("from a global address (not a router's link-local)", "2001:db8:ff::10", 255),
    ("forwarded (hop limit below 255: sent from beyond the link)", "auto", 64),
])
def test_an_ra_on_the_public_segment_not_from_an_on_link_router_is_dropped(clean: Lab, why: str, source: str,
                                                                          hops: int) -> None:
    lab = clean
    assert lab.others.internet.address6 == source or source == "auto"
    accepted = ra_rule_counter(lab, WITH_IPV6)
    send_ra(lab, "internet", "eth0", source=source, hops=hops, reaching=(WITH_IPV6, WITHOUT_IPV6))
    assert ra_rule_counter(lab, WITH_IPV6) == accepted, why  # the firewall refused it, not only the kernel
    assert learned(lab, WITH_IPV6) == [] and learned(lab, WITHOUT_IPV6) == [], why


def test_with_the_old_rule_the_neighbors_ra_takes_over_a_host_without_ipv6(clean: Lab) -> None:
    """The control: the rule before the fix (RA accepted on every interface from anyone with hop limit 255)
    lets the neighbour's RA give mysql-1 an address and a default route via the neighbour, so the tests above
    see the difference the rules make, not a kernel that ignores RAs."""
    lab = clean
    files = lab.files[WITHOUT_IPV6]
    old_rule = "-A ENCLAVE-INPUT -p ipv6-icmp -m icmp6 --icmpv6-type router-advertisement -m hl --hl-eq 255 -j ACCEPT\n"
    invalid_drop = "-A ENCLAVE-INPUT -m conntrack --ctstate INVALID -j DROP\n"
    old = dataclasses.replace(files, ipv6=files.ipv6.replace(invalid_drop, old_rule + invalid_drop))
    assert old.ipv6 != files.ipv6
    try:
        lab.push(WITHOUT_IPV6, old)
        send_ra(lab, "neighbor", "eth1", reaching=(WITHOUT_IPV6,))
        got = learned(lab, WITHOUT_IPV6)
    finally:
        lab.push(WITHOUT_IPV6)
    neighbour = link_local(lab, "neighbor", "eth1")
    assert any(" eth1 inet6 2001:db8:aa:" in line for line in got), got
    assert f"default via {neighbour} dev eth1 " in " ".join(got), got


def test_hosts_on_their_first_boot_baseline_take_ras_exactly_as_pushed_hosts_do(run_ids: list[str], dev6: Stack) -> None:
    """Before the first push a droplet runs its cloud-init baseline: the same ICMPv6 control rules."""
    with Lab(dev6) as lab:  # booted on the baseline, nothing pushed
        run_ids.append(lab.run_id)
        assert "baseline" in lab.console(WITHOUT_IPV6, "iptables -w -S ENCLAVE-INPUT").stdout
        take_ras(lab)
        hosts = tuple(lab.files)
        send_ra(lab, "neighbor", "eth1", reaching=hosts)
        after_neighbour = {host: learned(lab, host) for host in hosts}
        send_ra(lab, "internet", "eth0", reaching=hosts)
        after_gateway = {host: learned(lab, host) for host in hosts}
    assert after_neighbour == {host: [] for host in hosts}
    assert any(" eth0 inet6 2001:db8:aa:" in line for line in after_gateway[WITH_IPV6]), after_gateway
    assert {h: got for h, got in after_gateway.items() if h != WITH_IPV6} == {h: [] for h in hosts if h != WITH_IPV6}


# ---------------------------------------------------------------------------------- ICMPv6 errors

# Runs on a host: a connected UDP socket sends one 1 400-byte datagram out of the public interface and stays
# open (the kernel updates the path MTU only for a socket that sent what the error quotes); prints its port.
UDP_TALKER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"x" * 1400)
print(s.getsockname()[1], flush=True)
time.sleep(float(sys.argv[3]))
"""

# Runs on the sender: an ICMPv6 packet-too-big (RFC 4443 3.2) quoting the host's datagram as the path saw it:
# its IPv6 header (the datagram was 1 400 bytes of payload and a UDP header) and UDP header.
PTB_SENDER = r"""
import socket, struct, sys
host, src_port, peer, peer_port, mtu = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
quoted = struct.pack("!IHBB", 6 << 28, 1408, 17, 64) + socket.inet_pton(socket.AF_INET6, host)
quoted += socket.inet_pton(socket.AF_INET6, peer) + struct.pack("!HHHH", src_port, peer_port, 1408, 0) + b"x" * 64
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.sendto(struct.pack("!BBHI", 2, 0, 0, mtu) + quoted, (host, 0))
"""


def path_mtu_after_packet_too_big(lab: Lab, host: str, mtu: int) -> str:
    """The host sends a datagram to the Internet; the Internet answers packet-too-big; what route does the host
    use to the Internet then (`ip -6 route get`: an `mtu` appears once the error was taken)?"""
    internet6 = lab.others.internet.address6
    assert internet6 is not None
    lab.run(host, ["ip", "-6", "route", "flush", "cache"], check=True)
    talker = subprocess.Popen(lab.in_ns(host, [sys.executable, "-c", UDP_TALKER, internet6, "9", "10"]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert talker.stdout is not None
        port = talker.stdout.readline().strip()
        host6 = lab.addresses[host].public6
        assert host6 is not None
        lab.run("internet", [sys.executable, "-c", PTB_SENDER, host6, port, internet6, "9", str(mtu)], check=True)
        time.sleep(0.3)
        return lab.run(host, ["ip", "-6", "route", "get", internet6], check=True).stdout
    finally:
        talker.kill()
        talker.wait()
        lab.run(host, ["ip", "-6", "route", "flush", "cache"], check=True)


def test_path_mtu_discovery_works_through_the_replies_rule_alone(lab: Lab) -> None:
    """Errors are accepted only as RELATED to a connection of the host: a packet-too-big about the host's own
    datagram still lowers its path MTU to the Internet."""
    assert " mtu 1280 " in path_mtu_after_packet_too_big(lab, WITH_IPV6, 1280) + " "


def test_without_the_related_state_the_same_packet_too_big_is_dropped(lab: Lab) -> None:
    """The control: the same rules accepting only ESTABLISHED drop the error, and the path MTU stays."""
    files = lab.files[WITH_IPV6]
    no_related = dataclasses.replace(files, ipv6=files.ipv6.replace(
        "-A ENCLAVE-INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A ENCLAVE-INPUT -m conntrack --ctstate ESTABLISHED -j ACCEPT"))
    assert no_related.ipv6 != files.ipv6
    try:
        lab.push(WITH_IPV6, no_related)
        route = path_mtu_after_packet_too_big(lab, WITH_IPV6, 1280)
    finally:
        lab.push(WITH_IPV6)
    assert " mtu " not in route + " ", route
