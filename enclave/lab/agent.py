"""The lab's probe agent: ONE process serving every namespace of a lab (stdlib only).

A socket belongs to the network namespace its creating thread was in when it was created, and keeps it: the
agent enters each lab namespace with setns(2) just long enough to create a socket there, and returns to its
own. So one process listens in every host's namespace and sends every probe from its source's namespace, at a
few MB for the whole lab instead of a Python process per namespace (25 MB each: 5 GB at 200 hosts).

It does two things:
  * listens on the given TCP and UDP ports in every host namespace (dual-stack, so one socket serves IPv4 and
    IPv6): a TCP probe that completes its handshake, or a UDP datagram that gets its echo back, has passed the
    host's firewall;
  * runs probes for the controller, which talks to it over a Unix socket in the lab directory.

Control protocol, one JSON object per line:
  {"probes": [[id, source, "tcp"|"udp"|"icmp", address, port, timeout_s], ...]}
    -> {"results": [[id, passed, detail], ...]} lines as probes finish (so the controller can tell a busy agent
       from a lost one: it waits a bounded time for the NEXT line, however many probes are queued), then
       {"done": n}
A probe that passed the firewall is `passed`; a dropped packet just times out; a REJECT shows as refused; an
error of the source's own kernel (no buffer space, no route, unreachable neighbour) is named by its errno, and
the controller treats it as a failure of the harness, not as the firewall's verdict.

Run as: python -m enclave.lab.agent --control SOCK --namespaces SPEC.json, where SPEC is
  [{"name": "mysql-1", "netns": "/run/netns/enc-…-mysql-1", "tcp": [80, …], "udp": [53, …]}, …]
It prints "ready" on stdout once every socket is bound and every kind of probe has passed over loopback in
every namespace, and exits with the reason otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import json
import os
import resource
import socket
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

PAYLOAD = b"enclave-lab-probe"
MAX_CONCURRENT_PROBES = 2048
RESULTS_PER_LINE = 256
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class Namespaces:
    """File descriptors of the lab's namespaces, and a way to create a socket inside one of them."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self.fds = {name: os.open(path, os.O_RDONLY) for name, path in paths.items()}

    @contextmanager
    def inside(self, name: str) -> Iterator[None]:
        # Python 3.12 has os.setns; this runs on 3.11 too. Only this thread moves, and only for the block.
        if _libc.setns(self.fds[name], CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns into {name}: {os.strerror(code)}")
        try:
            yield
        finally:
            if _libc.setns(self.home, CLONE_NEWNET) != 0:  # cannot happen short of a kernel bug: never go on
                os.write(2, f"enclave lab agent: cannot return to its own namespace: {os.strerror(ctypes.get_errno())}\n".encode())
                os._exit(70)

    def socket(self, name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
        with self.inside(name):
            return socket.socket(family, kind, proto)


# ------------------------------------------------------------------------------------------ listeners


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


def _dual_stack(namespaces: Namespaces, name: str, kind: socket.SocketKind, port: int) -> socket.socket:
    sock = namespaces.socket(name, socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"enclave lab agent: cannot listen on {kind.name} port {port} in {name}: {exc}") from None
    return sock


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def listen(namespaces: Namespaces, name: str, tcp_ports: list[int], udp_ports: list[int]) -> list[Any]:
    loop = asyncio.get_running_loop()
    keep: list[Any] = []
    for port in tcp_ports:
        sock = _dual_stack(namespaces, name, socket.SOCK_STREAM, port)
        sock.listen(1024)
        keep.append(await asyncio.start_server(_close_at_once, sock=sock))
    for port in udp_ports:
        sock = _dual_stack(namespaces, name, socket.SOCK_DGRAM, port)
        transport, _ = await loop.create_datagram_endpoint(_Echo, sock=sock)
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


async def probe_tcp(sock: socket.socket, address: str, port: int, timeout: float) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    with sock:
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
    with sock:
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


async def run_probe(namespaces: Namespaces, limit: asyncio.Semaphore, source: str, proto: str, address: str,
                    port: int, timeout: float) -> tuple[bool, str]:
    async with limit:
        family = _family(address)
        try:
            if proto == "tcp":
                return await probe_tcp(namespaces.socket(source, family, socket.SOCK_STREAM), address, port, timeout)
            if proto == "udp":
                sock = namespaces.socket(source, family, socket.SOCK_DGRAM)
                return await _exchange(sock, address, port, PAYLOAD, timeout)
            # ICMP echo on a ping socket: the kernel fills in the identifier and the checksum
            six = family == socket.AF_INET6
            sock = namespaces.socket(source, family, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6 if six else socket.IPPROTO_ICMP)
            echo = struct.pack("!BBHHH", 128 if six else 8, 0, 0, 0, 1) + PAYLOAD
            return await _exchange(sock, address, 0, echo, timeout)
        except OSError as exc:  # the socket itself could not be made (out of files, memory)
            return False, _os_error(exc)
        except KeyError:
            return False, f"{source}'s namespace is not served by this agent"


def answerer(namespaces: Namespaces, limit: asyncio.Semaphore) -> Any:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            probes = json.loads(line).get("probes", [])
            pending = [asyncio.ensure_future(_one(namespaces, limit, p)) for p in probes]
            batch: list[list[Any]] = []
            for finished in asyncio.as_completed(pending):
                batch.append(await finished)
                if len(batch) >= RESULTS_PER_LINE:
                    writer.write(json.dumps({"results": batch}).encode() + b"\n")
                    await writer.drain()
                    batch = []
            if batch:
                writer.write(json.dumps({"results": batch}).encode() + b"\n")
            writer.write(json.dumps({"done": len(probes)}).encode() + b"\n")
            await writer.drain()
        writer.close()

    return answer


async def _one(namespaces: Namespaces, limit: asyncio.Semaphore, p: list[Any]) -> list[Any]:
    passed, detail = await run_probe(namespaces, limit, p[1], p[2], p[3], p[4], p[5])
    return [p[0], passed, detail]


# ----------------------------------------------------------------------------------------------- main


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 1 << 20), max(hard, 1 << 20)))  # root may raise it
    except (ValueError, OSError):  # not in a container without CAP_SYS_RESOURCE
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def concurrency() -> int:
    """How many probes may be in flight: each holds up to two descriptors (a TCP probe's socket and the
    listener's accepted one), and the listeners and namespaces already hold theirs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    free = soft - len(os.listdir("/proc/self/fd")) - 64
    if free < 32:
        raise SystemExit(f"enclave lab agent: only {free} file descriptors left of {soft} (ulimit -n) after its "
                         "listeners: raise the limit, or probe fewer hosts (enclave lab check --sample)")
    return min(MAX_CONCURRENT_PROBES, free // 2)


async def self_check(namespaces: Namespaces, spec: list[dict[str, Any]]) -> None:
    """Every kind of probe must be able to pass in every namespace: over loopback (always open) to this agent's
    own listeners there. Without this, a broken probe would look exactly like a firewall that drops it."""
    limit = asyncio.Semaphore(concurrency())
    checks = []
    for entry in spec:
        name = entry["name"]
        checks += [(name, "icmp", address, 0) for address in ("127.0.0.1", "::1")]
        checks += [(name, proto, address, port) for proto in ("tcp", "udp") for port in entry[proto]
                   for address in ("127.0.0.1", "::1")]
    verdicts = await asyncio.gather(*(run_probe(namespaces, limit, n, proto, a, port, 5.0) for n, proto, a, port in checks))
    failed = [f"{n}: {proto}/{port} to {a}: {detail}" for (n, proto, a, port), (ok, detail) in zip(checks, verdicts) if not ok]
    if failed:
        raise SystemExit(f"enclave lab agent: probes fail over loopback, so they would prove nothing: {failed[:20]}")


async def main_async(args: argparse.Namespace) -> None:
    _raise_file_limit()
    with open(args.namespaces) as f:
        spec: list[dict[str, Any]] = json.load(f)
    namespaces = Namespaces({entry["name"]: entry["netns"] for entry in spec})
    keep = [await listen(namespaces, entry["name"], entry["tcp"], entry["udp"]) for entry in spec]
    await self_check(namespaces, spec)
    if os.path.exists(args.control):
        os.unlink(args.control)
    limit = asyncio.Semaphore(concurrency())
    control = await asyncio.start_unix_server(answerer(namespaces, limit), path=args.control, limit=1 << 26)
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
    parser.add_argument("--namespaces", required=True, help="JSON file: the namespaces, and the ports to listen on in each")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
