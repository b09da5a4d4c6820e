"""Network namespaces for the benchmarks: one client joined to one or more servers by veth pairs.

Nothing is added to the machine's own namespace: every namespace is created empty, each veth pair is created
inside the client namespace and its peer end moved into a server namespace. Traffic goes only between
addresses of these namespaces. Every server sees the client at the same address (the rulesets admit it by
source address), so several rulesets can be loaded side by side and measured in quick alternation.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


class BenchError(RuntimeError):
    """A benchmark could not run (missing tool, not root, a command failed): says what and how to fix it."""


def run(argv: Sequence[str], input: str | None = None, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise BenchError(f"`{' '.join(argv)[:200]}` failed ({out.returncode}): {out.stderr.strip()[:2000]}")
    return out.stdout


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise BenchError(f"{what} needs root (network namespaces, iptables); run `sudo make bench`")


def netns_exec(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@dataclass(frozen=True)
class Pair:
    """The client namespace and one server namespace, seen from the server's side."""

    client: str  # namespace names
    server: str
    server_if: str
    client_ip: str
    server_ip: str

    def exec(self, ns: str, *argv: str) -> list[str]:
        return netns_exec(ns, *argv)

    def in_server(self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 120) -> str:
        return run(netns_exec(self.server, *argv), input=input, check=check, timeout=timeout)

    def in_client(self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 120) -> str:
        return run(netns_exec(self.client, *argv), input=input, check=check, timeout=timeout)


# Sysctls set inside the namespaces (never in the machine's own): short conntrack timeouts for closed
# connections so hundreds of thousands of short connections do not fill the conntrack table, a deep accept
# queue, and a wide source-port range for the client.
SERVER_SYSCTLS = {
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait": "1",
    "net.netfilter.nf_conntrack_tcp_timeout_fin_wait": "1",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait": "1",
    "net.netfilter.nf_conntrack_tcp_timeout_last_ack": "1",
    "net.netfilter.nf_conntrack_tcp_timeout_close": "1",
    "net.ipv4.tcp_max_syn_backlog": "8192",
    "net.core.somaxconn": "8192",
}
CLIENT_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65000",
    "net.ipv4.tcp_tw_reuse": "1",
}


def _end(ns: str) -> None:
    # Ends whatever still runs inside (servers, load tools, push timers), then removes the namespace.
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def star(client_ip: str, server_ips: Sequence[str], prefix: int, server_if: str = "eth1") -> Iterator[list[Pair]]:
    """A client namespace and one server namespace per address in `server_ips`, each on its own veth pair."""
    require_root("this benchmark")
    run_id = uuid.uuid4().hex[:6]
    client = f"encb-{run_id}-cli"
    pairs = [Pair(client, f"encb-{run_id}-srv{i}", server_if, client_ip, ip) for i, ip in enumerate(server_ips)]
    created: list[str] = []
    try:
        for ns in [client, *(p.server for p in pairs)]:
            run(["ip", "netns", "add", ns])
            created.append(ns)
        run(["ip", "-n", client, "link", "set", "lo", "up"])
        for i, p in enumerate(pairs):
            client_if = f"veth{i}"
            run(["ip", "-n", client, "link", "add", client_if, "type", "veth",
                 "peer", "name", server_if, "netns", p.server])
            run(["ip", "-n", client, "addr", "add", f"{client_ip}/32", "dev", client_if])
            run(["ip", "-n", client, "link", "set", client_if, "up"])
            run(["ip", "-n", client, "route", "add", f"{p.server_ip}/32", "dev", client_if, "src", client_ip])
            run(["ip", "-n", p.server, "addr", "add", f"{p.server_ip}/{prefix}", "dev", server_if])
            run(["ip", "-n", p.server, "link", "set", server_if, "up"])
            run(["ip", "-n", p.server, "link", "set", "lo", "up"])
            # A route back to the client even when it lies outside the server's prefix.
            run(["ip", "-n", p.server, "route", "replace", f"{client_ip}/32", "dev", server_if])
            # Load conntrack in the server namespace so its sysctls exist, then set them.
            p.in_server("iptables", "-w", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "ACCEPT")
            p.in_server("iptables", "-w", "-F", "INPUT")
            for key, value in SERVER_SYSCTLS.items():
                p.in_server("sysctl", "-qw", f"{key}={value}", check=False)
        for key, value in CLIENT_SYSCTLS.items():
            run(netns_exec(client, "sysctl", "-qw", f"{key}={value}"), check=False)
        yield pairs
    finally:
        for ns in reversed(created):
            _end(ns)


@contextmanager
def namespace_pair(client_ip: str, server_ip: str, prefix: int, server_if: str = "eth1") -> Iterator[Pair]:
    with star(client_ip, [server_ip], prefix, server_if) as pairs:
        yield pairs[0]
