"""The lab's probe agent: one process per lab namespace, stdlib only (it starts in ~50 ms, before the probes).

It does two things inside its namespace:
  * listens on the given TCP and UDP ports (dual-stack, so one socket serves IPv4 and IPv6): a TCP probe
    that completes its handshake, or a UDP datagram that gets its echo back, has passed the host's firewall;
  * runs probes for the controller, which talks to it over a Unix socket in the lab directory (Unix sockets
    on the filesystem cross network namespaces, so the controller needs no address in any namespace).

Control protocol, one JSON object per line:
  {"probes": [[id, "tcp"|"udp"|"icmp", address, port, timeout_s], ...]}
    -> {"results": [[id, passed, detail], ...]}
A probe that passed the firewall is `passed`; a dropped packet just times out; a REJECT shows as refused.

Run as: ip netns exec NS python -m enclave.lab.agent --control SOCK [--tcp PORTS] [--udp PORTS]
It prints "ready" on stdout once every socket is bound and every kind of probe has passed over loopback, and
exits with the reason otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import resource
import socket
import struct
import sys
from typing import Any, cast

PAYLOAD = b"enclave-lab-probe"
MAX_CONCURRENT_PROBES = 512


# ------------------------------------------------------------------------------------------ listeners


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


def _dual_stack(kind: socket.SocketKind, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"enclave lab agent: cannot listen on {kind.name} port {port}: {exc}") from None
    return sock


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def listen(tcp_ports: list[int], udp_ports: list[int]) -> list[Any]:
    loop = asyncio.get_running_loop()
    keep: list[Any] = []
    for port in tcp_ports:
        sock = _dual_stack(socket.SOCK_STREAM, port)
        sock.listen(1024)
        keep.append(await asyncio.start_server(_close_at_once, sock=sock))
    for port in udp_ports:
        transport, _ = await loop.create_datagram_endpoint(_Echo, sock=_dual_stack(socket.SOCK_DGRAM, port))
        keep.append(transport)
    return keep


# --------------------------------------------------------------------------------------------- probes


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _os_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused (REJECT or no listener)"
    if exc.errno in (errno.EPERM, errno.EACCES):
        return "blocked by the source's own OUTPUT rules"
    return errno.errorcode.get(exc.errno or 0, str(exc)).lower()


async def probe_tcp(address: str, port: int, timeout: float) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    with socket.socket(_family(address), socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (address, port)), timeout)
        except asyncio.TimeoutError:
            return False, "timeout"
        except OSError as exc:
            return False, _os_error(exc)
        return True, "connected"


async def _exchange(sock: socket.socket, address: str, port: int, packet: bytes, timeout: float) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        sock.connect((address, port))  # a datagram socket's connect only sets the peer: it never blocks
        await loop.sock_sendall(sock, packet)
        await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)
    except asyncio.TimeoutError:
        return False, "timeout"
    except OSError as exc:
        return False, _os_error(exc)
    return True, "reply"


async def probe_udp(address: str, port: int, timeout: float) -> tuple[bool, str]:
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
        return await _exchange(sock, address, port, PAYLOAD, timeout)


async def probe_icmp(address: str, timeout: float) -> tuple[bool, str]:
    """An echo request on a ping socket: the kernel fills in the identifier and the checksum."""
    family = _family(address)
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    echo_request = 128 if family == socket.AF_INET6 else 8
    with socket.socket(family, socket.SOCK_DGRAM, proto) as sock:
        return await _exchange(sock, address, 0, struct.pack("!BBHHH", echo_request, 0, 0, 0, 1) + PAYLOAD, timeout)


async def run_probe(limit: asyncio.Semaphore, proto: str, address: str, port: int, timeout: float) -> tuple[bool, str]:
    async with limit:
        if proto == "tcp":
            return await probe_tcp(address, port, timeout)
        if proto == "udp":
            return await probe_udp(address, port, timeout)
        return await probe_icmp(address, timeout)


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
    while line := await reader.readline():
        request = json.loads(line)
        probes = request.get("probes", [])
        verdicts = await asyncio.gather(*(run_probe(limit, p[1], p[2], p[3], p[4]) for p in probes))
        results = [[p[0], passed, detail] for p, (passed, detail) in zip(probes, verdicts)]
        writer.write(json.dumps({"results": results}).encode() + b"\n")
        await writer.drain()
    writer.close()


# ----------------------------------------------------------------------------------------------- main


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def _prepare_namespace() -> None:
    # Ping sockets (no raw socket, no setuid ping) for every group in this namespace only.
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write("0 2147483647")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


async def self_check(tcp_ports: list[int], udp_ports: list[int]) -> None:
    """Every kind of probe must be able to pass: over loopback (always open) to this agent's own listeners.

    Without this, a broken probe would look exactly like a firewall that drops it.
    """
    limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
    checks = [("icmp", address, 0) for address in ("127.0.0.1", "::1")]
    checks += [(proto, address, port) for proto, ports in (("tcp", tcp_ports), ("udp", udp_ports))
               for port in ports for address in ("127.0.0.1", "::1")]
    verdicts = await asyncio.gather(*(run_probe(limit, proto, address, port, 2.0) for proto, address, port in checks))
    failed = [f"{proto}/{port} to {address}: {detail}" for (proto, address, port), (ok, detail) in zip(checks, verdicts) if not ok]
    if failed:
        raise SystemExit(f"enclave lab agent: probes fail over loopback, so they would prove nothing: {failed}")


async def main_async(args: argparse.Namespace) -> None:
    _prepare_namespace()
    keep = await listen(_ports(args.tcp), _ports(args.udp))
    await self_check(_ports(args.tcp), _ports(args.udp))
    if os.path.exists(args.control):
        os.unlink(args.control)
    control = await asyncio.start_unix_server(answer, path=args.control, limit=1 << 24)
    print("ready", flush=True)
    # Nobody reads stdout after this (the controller may exit while a kept lab runs on).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    async with control:
        await control.serve_forever()
    del keep


def main() -> None:
    parser = argparse.ArgumentParser(prog="enclave.lab.agent")
    parser.add_argument("--control", required=True, help="Unix socket path the controller sends probes to")
    parser.add_argument("--tcp", default="", help="comma-separated TCP ports to listen on")
    parser.add_argument("--udp", default="", help="comma-separated UDP ports to listen on")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
