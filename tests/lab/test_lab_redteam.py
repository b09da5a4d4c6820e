"""Issue 20's attacks, with real packets in the lab: published container ports, forged ICMP redirects, spoofing
on the private segment, and forged ICMP errors.

Docker is emulated (no dockerd here): its rules are written exactly as moby writes them with the iptables backend
(moby/moby b985e231, daemon/libnetwork/...), the container is a network namespace behind a `docker0` bridge on
mysql-1, and forwarding is on. The forged packets come from a raw socket in the lab's `neighbor` namespace, which
sits on the private segment as any other droplet of the VPC would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from config.stackfile import load_stack
from enclave.lab.lab import Lab
from enclave.render import ICMP_REDIRECT

from ..conftest import pushed_lab
from .test_lab import _unavailable

pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=f"lab unavailable: {_unavailable()}")

DEADLINE_S = 20.0  # waiting for an event (a route to move, a datagram to arrive): generous on a busy machine
QUIET_S = 2.0  # how long a connection attempt or a datagram that must NOT get through is given

CONTAINER = "172.17.0.2"
PUBLISHED = {3306: 3306, 8080: 80}  # host port -> container port: mysql's 3306 is admitted, 8080 is not

# ------------------------------------------------------------------------------------------ Docker, emulated

# dockerd's start with the iptables backend, rule for rule (one bridge network, docker0 172.17.0.0/16, icc on,
# masquerade on, gateway mode nat; the shape of moby's golden file
# drivers/bridge/internal/iptabler/testdata/TestIptabler/hairpin=false,internal=false,icc=true,masq=true,snat=false,gwm=nat,bindlh=false__iptables.golden).
# moby paths below are under daemon/libnetwork/.
DOCKER_START = r"""
set -e
# iptables/iptables.go L167-187 NewChain: `-n -L`, then `-N` only if missing (never a flush)
new_chain() { iptables -w -t "$1" -n -L "$2" >/dev/null 2>&1 || iptables -w -t "$1" -N "$2"; }
# iptables/iptables.go L450-459 EnsureJumpRule: delete the jump, then insert it at the top
ensure_jump() { iptables -w -D "$1" -j "$2" 2>/dev/null || true; iptables -w -I "$1" -j "$2"; }
# drivers/bridge/internal/iptabler/iptabler.go L121-220 setupIPChains
new_chain nat DOCKER
for c in DOCKER DOCKER-FORWARD DOCKER-BRIDGE DOCKER-CT DOCKER-INTERNAL; do new_chain filter $c; done
ensure_jump FORWARD DOCKER-FORWARD
ensure_jump DOCKER-FORWARD DOCKER-BRIDGE
ensure_jump DOCKER-FORWARD DOCKER-INTERNAL
ensure_jump DOCKER-FORWARD DOCKER-CT
# iptabler.go L95-108 FilterForwardDrop (dockerd enables ip_forward and sets FORWARD's policy to DROP)
sysctl -qw net.ipv4.ip_forward=1
iptables -w -P FORWARD DROP
# drivers/bridge/internal/iptabler/network.go L150-175 addNATJumpRules
iptables -w -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
iptables -w -t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
# network.go L267-290 (MASQUERADE), L326-345 (icc: the bridge's own traffic out), L240-265 setDefaultForwardRule,
# L111-131 (DOCKER-CT replies, DOCKER-BRIDGE jump)
iptables -w -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
iptables -w -A DOCKER-FORWARD -i docker0 -j ACCEPT
iptables -w -A DOCKER ! -i docker0 -o docker0 -j DROP
iptables -w -A DOCKER-CT -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
iptables -w -A DOCKER-BRIDGE -o docker0 -j DOCKER
# drivers/bridge/internal/iptabler/port.go L77-140: per published port a DNAT in nat DOCKER and an ACCEPT inserted
# at the top of filter DOCKER; L197-230: direct routing to the container dropped in raw PREROUTING
iptables -w -t raw -A PREROUTING -d 172.17.0.2/32 ! -i docker0 -j DROP
""" + "".join(
    f"iptables -w -t nat -A DOCKER ! -i docker0 -p tcp -m tcp --dport {host} -j DNAT --to-destination 172.17.0.2:{ctr}\n"
    f"iptables -w -I DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport {ctr} -j ACCEPT\n"
    for host, ctr in PUBLISHED.items()
) + r"""
# firewall_linux.go L62-80 setupUserChain, last step of the controller's start: DOCKER-USER if missing (never
# flushed), and its FORWARD jump moved to the top
new_chain filter DOCKER-USER
ensure_jump FORWARD DOCKER-USER
"""

# What a daemon restart may do to Docker's own chains at worst: they are gone, DOCKER-USER and its contents stay
# (firewall_linux.go L66-72: "The daemon does not delete or modify any pre-existing rules from the DOCKER-USER
# filter chain"). DOCKER_START then rebuilds them as above.
DOCKER_TEARDOWN = r"""
iptables -w -D FORWARD -j DOCKER-FORWARD 2>/dev/null
iptables -w -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j DOCKER 2>/dev/null
iptables -w -t nat -D OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER 2>/dev/null
iptables -w -t nat -D POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE 2>/dev/null
iptables -w -t raw -D PREROUTING -d 172.17.0.2/32 ! -i docker0 -j DROP 2>/dev/null
for c in DOCKER DOCKER-FORWARD DOCKER-BRIDGE DOCKER-CT DOCKER-INTERNAL; do iptables -w -F $c; done
for c in DOCKER DOCKER-FORWARD DOCKER-BRIDGE DOCKER-CT DOCKER-INTERNAL; do iptables -w -X $c; done
iptables -w -t nat -F DOCKER && iptables -w -t nat -X DOCKER
"""

# A TCP connect with a deadline; prints what the peer sent, or why nothing came.
CONNECT = r"""
import socket, sys
dst, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket()
if len(sys.argv) > 4:
    s.bind((sys.argv[4], 0))
s.settimeout(wait)
try:
    s.connect((dst, port))
    print(s.recv(100).decode().strip() or "connected")
except OSError as exc:
    print(f"no connection: {exc}")
"""

# The container's services: each connection is told which container port it reached.
SERVE = r"""
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(f"container:{port}\n".encode()); c.close()
ports = [int(p) for p in sys.argv[1:]]
for p in ports[1:]:
    threading.Thread(target=serve, args=(p,), daemon=True).start()
serve(ports[0])
"""


def connect(lab: Lab, source: str, dst: str, port: int, *, bind: str | None = None) -> str:
    argv = [sys.executable, "-c", CONNECT, dst, str(port), str(QUIET_S)] + ([bind] if bind else [])
    return lab.run(source, argv, check=True, timeout=60).stdout.strip()


def wait_for(what: Callable[[], bool], why: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not what():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S} s: {why}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab(run_ids: list[str]) -> Iterator[Lab]:
    """dev, not pushed yet: the hosts are on their baseline."""
    with Lab(load_stack("dev")) as lab:
        run_ids.append(lab.run_id)
        yield lab


@pytest.fixture(scope="module")
def container(lab: Lab) -> Iterator[str]:
    """A container on mysql-1 (a namespace behind docker0) serving the container ports; Docker's rules NOT yet."""
    ns, host_ns = lab.namespace("ctr"), lab.namespace("mysql-1")
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "-n", host_ns, "link", "add", "docker0", "type", "bridge"],
        ["ip", "-n", host_ns, "address", "add", "172.17.0.1/16", "dev", "docker0"],
        ["ip", "-n", host_ns, "link", "set", "docker0", "up"],
        ["ip", "-n", host_ns, "link", "add", "vethctr", "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "-n", host_ns, "link", "set", "vethctr", "master", "docker0", "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "address", "add", f"{CONTAINER}/16", "dev", "eth0"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
        ["ip", "-n", ns, "route", "add", "default", "via", "172.17.0.1"],
    ]
    for argv in steps:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVE,
                               *(str(p) for p in PUBLISHED.values())])
    try:
        wait_for(lambda: "container:3306" in lab.run("mysql-1", [sys.executable, "-c", CONNECT, CONTAINER, "3306", "2"]).stdout,
                 "the container's service answers on the bridge")
        yield ns
    finally:
        server.kill()
        server.wait()


def reached(lab: Lab) -> dict[tuple[str, int], bool]:
    """Which (source, published port) pairs reach the container through mysql-1's addresses."""
    mysql = lab.addresses["mysql-1"]
    out = {}
    for source, address in (("wordpress-1", mysql.private), ("neighbor", mysql.private), ("internet", mysql.require_public("mysql-1"))):
        for port, ctr in PUBLISHED.items():
            answer = connect(lab, source, address, port)
            assert answer.startswith(("container:", "no connection")), answer
            out[(source, port)] = answer == f"container:{ctr}"
    return out


# The policy (stacks/Pulumi.dev.yaml): mysql admits wordpress on tcp/3306 over the private interface; nothing else.
ADMITTED = {("wordpress-1", 3306): True, ("wordpress-1", 8080): False, ("neighbor", 3306): False,
            ("neighbor", 8080): False, ("internet", 3306): False, ("internet", 8080): False}


def docker_chains(lab: Lab) -> list[str]:
    """Docker's rules (every table), as iptables-save prints them: what must survive enclave."""
    saved = lab.console("mysql-1", "iptables-save -t filter; iptables-save -t nat; iptables-save -t raw").stdout
    return sorted(line for line in saved.splitlines() if line.startswith("-A") and "ENCLAVE" not in line)


def test_published_container_ports_admit_exactly_what_the_role_admits(lab: Lab, container: str) -> None:
    # Before any push (baseline) Docker starts: nothing from outside reaches a published port.
    lab.console("mysql-1", DOCKER_START)
    assert not any(reached(lab).values()), "the baseline publishes nothing"
    # The container's own traffic goes out (masqueraded) and its replies come back.
    listener = subprocess.Popen(["ip", "netns", "exec", lab.namespace("internet"), sys.executable, "-c", SERVE, "9000"])
    try:
        wait_for(lambda: connect(lab, "ctr", lab.others.internet.address or "", 9000) == "container:9000",
                 "the container reaches the Internet through the host")

        # The push, with Docker running: exactly the admitted flow gets through, Docker's chains untouched.
        before = docker_chains(lab)
        failures = lab.push_all()
        assert not failures, [str(f) for f in failures.values()]
        assert reached(lab) == ADMITTED
        assert docker_chains(lab) == before
        assert connect(lab, "ctr", lab.others.internet.address or "", 9000) == "container:9000"

        # Docker restarts (its chains rebuilt, its FORWARD jumps back on top): the policy still holds.
        lab.console("mysql-1", DOCKER_TEARDOWN + DOCKER_START)
        forward = [line for line in lab.console("mysql-1", "iptables -w -S FORWARD").stdout.splitlines() if "-j" in line]
        assert forward[:2] == ["-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-FORWARD"]
        assert reached(lab) == ADMITTED
        assert docker_chains(lab) == before

        # And a push after the restart changes nothing of Docker's and keeps the policy.
        lab.push("mysql-1")
        assert reached(lab) == ADMITTED and docker_chains(lab) == before
        assert connect(lab, "ctr", lab.others.internet.address or "", 9000) == "container:9000"
    finally:
        listener.kill()
        listener.wait()
    # The same ports without enclave's hook: Docker alone lets everyone in (what issue 20 found).
    lab.console("mysql-1", "iptables -w -D DOCKER-USER -j ENCLAVE-FORWARD")
    try:
        assert all(reached(lab).values())
    finally:
        lab.push("mysql-1")  # the push puts the hook back
    assert reached(lab) == ADMITTED


# ------------------------------------------------------------------------------------------ forged packets

# A raw IPv4 packet with a forged source, sent from the namespace this runs in:
#   argv: src dst proto(icmp|udp) ...
#   icmp TYPE CODE REST(hex 4 bytes: a redirect's gateway, a frag-needed's MTU) QSRC QDST QSPORT QDPORT: an ICMP
#     message quoting the IP and UDP header of a datagram QSRC:QSPORT -> QDST:QDPORT (the flow it is "about")
#   udp SPORT DPORT PAYLOAD
FORGE = r"""
import socket, struct, sys

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF

def ip(src, dst, proto, payload):
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, 0, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    return head[:10] + struct.pack("!H", csum(head)) + head[12:] + payload

src, dst, kind = sys.argv[1:4]
if kind == "icmp":
    kind_, code, rest, qsrc, qdst, qsport, qdport = sys.argv[4:11]
    quoted = ip(qsrc, qdst, 17, struct.pack("!HHHH", int(qsport), int(qdport), 8 + 16, 0) + b"\0" * 16)[:28]
    body = struct.pack("!BBH", int(kind_), int(code), 0) + bytes.fromhex(rest) + quoted
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    packet = ip(src, dst, 1, body)
else:
    sport, dport, payload = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6].encode()
    packet = ip(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(packet, (dst, 0))
"""

# A UDP socket that sends one datagram (the flow the forgery quotes or answers) and prints what comes back.
UDP_FLOW = r"""
import socket, sys
local, dst, dport, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((local, int(sys.argv[5])))
s.sendto(b"query", (dst, dport))
print("sent", flush=True)
s.settimeout(wait)
try:
    print("received " + s.recv(100).decode(), flush=True)
except OSError:
    print("nothing", flush=True)
"""


def forge(lab: Lab, *args: object) -> None:
    lab.run("neighbor", [sys.executable, "-c", FORGE, *(str(a) for a in args)], check=True)


def snmp(lab: Lab, host: str, group: str, field: str) -> int:
    """One kernel counter of /proc/net/snmp or /proc/net/netstat (IcmpMsg InType5, TcpExt IPReversePathFilter)."""
    text = lab.run(host, ["cat", "/proc/net/snmp", "/proc/net/netstat"], check=True).stdout.splitlines()
    for names, values in zip(text[::2], text[1::2]):
        if names.startswith(group + ":"):
            fields = dict(zip(names.split()[1:], values.split()[1:]))
            return int(fields.get(field, 0))
    return 0


def redirects_dropped(lab: Lab, host: str) -> int:
    """Packets matched so far by ENCLAVE-INPUT's redirect drop."""
    listing = lab.console(host, "iptables -w -vnxL ENCLAVE-INPUT").stdout
    return sum(int(line.split()[0]) for line in listing.splitlines() if "icmptype 5" in line and "DROP" in line)


@pytest.fixture(scope="module")
def pushed(lab: Lab) -> Lab:
    failures = lab.push_all()
    assert not failures, [str(f) for f in failures.values()]
    return lab


ROUTED = "203.0.113.5"  # a destination wordpress-1 reaches through a gateway on the private segment


def test_a_forged_redirect_about_a_tracked_flow_moves_no_route(pushed: Lab) -> None:
    """The neighbour, spoofing wordpress-1's gateway (tunnel-1), tells it to send a tracked UDP flow via itself.
    enclave's rule drops it (even with accept_redirects on), the baseline's accept_redirects=0 ignores it (even
    without the rule); only with both gone does the route move, which shows the forgery itself is sound."""
    lab, host = pushed, "wordpress-1"
    gateway = lab.addresses["tunnel-1"].private
    me = lab.addresses[host].private
    attacker_iface, attacker, attacker_mac = lab.link("neighbor", "private") or ("", "", "")
    redirect = ("5", "1", bytes(map(int, attacker.split("."))).hex())

    def route() -> str:
        return lab.run(host, ["ip", "route", "get", ROUTED], check=True).stdout

    flow: subprocess.Popen[str] | None = None

    def attempt() -> None:
        """A tracked flow via the gateway, its socket open (the kernel acts on a redirect through the socket it is
        about), then the forged redirect about it."""
        nonlocal flow
        if flow is None or flow.poll() is not None:
            flow = subprocess.Popen(lab.in_ns(host, [sys.executable, "-c", UDP_FLOW, me, ROUTED, "5353", "600", "40000"]),
                                    stdout=subprocess.PIPE, text=True)
            assert flow.stdout is not None and flow.stdout.readline().strip() == "sent"
        forge(lab, gateway, me, "icmp", *redirect, me, ROUTED, 40000, 5353)

    sysctl = f"net.ipv4.conf.all.accept_redirects=%d net.ipv4.conf.{lab.interfaces.private}.accept_redirects=%d"
    lab.console(host, f"ip route replace 203.0.113.0/24 via {gateway} dev {lab.interfaces.private}\n"
                      # the kernel takes a redirect only to a gateway it can already reach
                      f"ip neigh replace {attacker} lladdr {attacker_mac} dev {attacker_iface} nud permanent\n")
    try:
        assert lab.run(host, ["sysctl", "-n", "net.ipv4.conf.all.accept_redirects"], check=True).stdout.strip() == "0"
        assert f"via {gateway} " in route()

        # enclave's rule alone (the host told to accept redirects)
        lab.run(host, ["sysctl", "-qw", *(sysctl % (1, 1)).split()], check=True)
        dropped = redirects_dropped(lab, host)
        attempt()
        wait_for(lambda: redirects_dropped(lab, host) > dropped, "the redirect reaches the drop rule")
        assert f"via {gateway} " in route()

        # accept_redirects=0 alone (the rule removed): the kernel receives the redirect and ignores it
        lab.run(host, ["sysctl", "-qw", *(sysctl % (0, 0)).split()], check=True)
        lab.console(host, f"iptables -w -D ENCLAVE-INPUT -p icmp -m icmp --icmp-type {ICMP_REDIRECT[4]} -j DROP")
        received = snmp(lab, host, "IcmpMsg", "InType5")
        attempt()
        wait_for(lambda: snmp(lab, host, "IcmpMsg", "InType5") > received, "the kernel receives the redirect")
        assert f"via {gateway} " in route()

        # neither: the same forgery moves the route to the attacker (what issue 20 found)
        lab.run(host, ["sysctl", "-qw", *(sysctl % (1, 1)).split()], check=True)

        def moved() -> bool:
            attempt()
            return f"via {attacker} " in route()
        wait_for(moved, "without the rule and the sysctl, the forged redirect moves the route")
    finally:
        if flow is not None:
            flow.kill()
            flow.wait()
        lab.console(host, f"ip route del 203.0.113.0/24\nip neigh del {attacker} dev {attacker_iface}\n", check=False)
        lab.push(host)  # the rule back, and apply.sh turns redirects off again
    assert "--icmp-type 5 -j DROP" in lab.console(host, "iptables -w -S ENCLAVE-INPUT").stdout
    assert lab.run(host, ["sysctl", "-n", f"net.ipv4.conf.{lab.interfaces.private}.accept_redirects"],
                   check=True).stdout.strip() == "0"


def test_forged_icmp_errors_and_replies_about_nothing_the_host_sent_change_nothing(pushed: Lab) -> None:
    """Errors are accepted only as RELATED, replies only as ESTABLISHED (render.py, "ICMP"): one that quotes a
    flow the host never sent, or answers a ping it never sent, is INVALID and dropped, whatever it says
    (fragmentation needed with a tiny MTU, unreachable, time exceeded, parameter problem, echo and timestamp
    replies)."""
    lab, host = pushed, "wordpress-1"
    me, peer = lab.addresses[host].private, lab.addresses["mysql-1"].private
    before = lab.run(host, ["ip", "route", "get", peer], check=True).stdout
    errors = [("3", "4", "00000100"), ("3", "1", "00000000"), ("11", "0", "00000000"), ("12", "0", "00000000"),
              ("0", "0", "abcd0001"), ("14", "0", "abcd0001")]
    received = snmp(lab, host, "Icmp", "InMsgs")
    invalid = rule_packets_invalid(lab, host)
    for kind, code, rest in errors:
        forge(lab, peer, me, "icmp", kind, code, rest, me, peer, 41000, 3306)  # no such flow was ever sent
    wait_for(lambda: rule_packets_invalid(lab, host) >= invalid + len(errors), "the forged errors reach the INVALID drop")
    assert snmp(lab, host, "Icmp", "InMsgs") == received  # none reached the kernel's ICMP handling
    assert lab.run(host, ["ip", "route", "get", peer], check=True).stdout == before  # no MTU learnt, nothing moved


def rule_packets_invalid(lab: Lab, host: str) -> int:
    listing = lab.console(host, "iptables -w -vnxL ENCLAVE-INPUT").stdout
    return sum(int(line.split()[0]) for line in listing.splitlines() if "ctstate INVALID" in line and "DROP" in line)


# --------------------------------------------------------------------------------------- the flat segment


def unpinned(lab: Lab, pairs: list[tuple[str, str]]) -> None:
    """Remove the lab's permanent neighbour entries (topology.Topology.neighbour_entries) between these
    namespaces' private interfaces, so ARP decides again, as on a real segment."""
    for a, b in pairs:
        link_b = lab.link(b, "private")
        assert link_b is not None
        lab.run(a, ["ip", "neigh", "del", link_b[1], "dev", lab.interfaces.private])


def test_a_neighbour_claiming_the_bastions_address_gets_what_the_bastion_is_admitted_no_more(pushed: Lab) -> None:
    """On a flat segment nothing in the host tells the bastion from a neighbour that claims its address (the
    provider's anti-spoofing does, on DigitalOcean's VPC): the claim reaches mysql-1's sshd, whose key check
    still stands, and nothing the bastion is not admitted to (3306 admits wordpress)."""
    lab, host = pushed, "mysql-1"
    bastion, target = lab.addresses["tunnel-1"].private, lab.addresses[host].private
    unpinned(lab, [(host, "tunnel-1"), ("neighbor", host)])
    lab.run("neighbor", ["ip", "address", "add", f"{bastion}/32", "dev", lab.interfaces.private], check=True)
    try:
        assert connect(lab, "neighbor", target, 22, bind=bastion).startswith("SSH-2.0-")
        assert connect(lab, "neighbor", target, 3306, bind=bastion).startswith("no connection")
        denied = lab.run("neighbor", ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                                      "-o", "UserKnownHostsFile=/dev/null", "-o", f"BindAddress={bastion}",
                                      "-o", "ConnectTimeout=10", f"root@{target}", "true"], timeout=60)
        assert denied.returncode == 255 and "Permission denied" in denied.stderr, denied.stderr
    finally:
        lab.run("neighbor", ["ip", "address", "del", f"{bastion}/32", "dev", lab.interfaces.private])
        lab.run(host, ["ip", "neigh", "flush", "dev", lab.interfaces.private])


def test_a_neighbour_spoofing_an_internet_address_on_the_private_interface_is_dropped(pushed: Lab) -> None:
    """conntrack ignores interfaces: a forged "reply" from an Internet address to a UDP flow the host has (a DNS
    query, say) is ESTABLISHED wherever it arrives. Strict reverse-path filtering on the private interface drops
    it there (the Internet is routed out of the public one); with it off, the forgery is delivered."""
    lab, host = pushed, "mysql-1"
    internet, public = lab.others.internet.address or "", lab.addresses[host].require_public(host)
    private_iface, private, mac = lab.link(host, "private") or ("", "", "")
    assert lab.run(host, ["sysctl", "-n", f"net.ipv4.conf.{private_iface}.rp_filter"], check=True).stdout.strip() == "1"
    lab.console("neighbor", f"ip route replace {public}/32 dev {lab.interfaces.private}\n"
                            f"ip neigh replace {public} lladdr {mac} dev {lab.interfaces.private} nud permanent\n")

    def forged_reply_delivered(wait: float) -> bool:
        flow = subprocess.Popen(lab.in_ns(host, [sys.executable, "-c", UDP_FLOW, public, internet, "53", str(wait), "40001"]),
                                stdout=subprocess.PIPE, text=True)
        assert flow.stdout is not None and flow.stdout.readline().strip() == "sent"
        filtered = snmp(lab, host, "TcpExt", "IPReversePathFilter")
        forge(lab, internet, public, "udp", 53, 40001, "forged")
        if wait < DEADLINE_S:  # the guarded case: wait for the kernel to count the drop
            wait_for(lambda: snmp(lab, host, "TcpExt", "IPReversePathFilter") > filtered, "rp_filter drops the forgery")
        out, _ = flow.communicate(timeout=DEADLINE_S + 30)
        return bool(out.strip() == "received forged")

    try:
        assert not forged_reply_delivered(QUIET_S)
        lab.run(host, ["sysctl", "-qw", f"net.ipv4.conf.{private_iface}.rp_filter=0"], check=True)
        assert forged_reply_delivered(DEADLINE_S)
    finally:
        lab.console("neighbor", f"ip route del {public}/32\nip neigh del {public} dev {lab.interfaces.private}\n", check=False)
        lab.push(host)  # apply.sh sets the rendered rp_filter again
    assert lab.run(host, ["sysctl", "-n", f"net.ipv4.conf.{private_iface}.rp_filter"], check=True).stdout.strip() == "1"
