"""Private roles in the lab (stacks/Pulumi.private.yaml): a `public: false` host has only its private interface
(eth0), reaches the Internet through the NAT namespace (masqueraded behind the gateway's public address), and
nothing on the Internet or the public segment can open a connection to it, even when it routes packets for the
VPC at the gateway. Needs root and the lab's tools, like tests/lab/test_lab.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml

from config.stackfile import load_stack, load_stack_file
from enclave.lab.base import NAT
from enclave.lab.lab import Lab

from ..conftest import pushed_lab, stack_document
from .test_lab import _unavailable

pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=f"lab unavailable: {_unavailable()}")

PORT = 8443  # declared nowhere: what a private host fetches from the Internet
# One connection: says "ready" once listening, then answers the first client with the address it came from.
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60)
print("ready", flush=True)
c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()
"""
CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(100).decode())
except OSError as e:
    print(f"failed: {e}")
"""


@pytest.fixture(scope="module")
def private_lab(run_ids: list[str]) -> Iterator[Lab]:
    with pushed_lab(load_stack("private"), run_ids) as lab:
        yield lab


def connect(lab: Lab, source: str, address: str, port: int, timeout: float = 5) -> str:
    return lab.run(source, [sys.executable, "-c", CLIENT, address, str(port), str(timeout)], check=True).stdout.strip()


def forward_drops(lab: Lab) -> int:
    """Packets the gateway's FORWARD policy dropped: proof that a packet got to it and went no further."""
    saved = lab.run(NAT, ["iptables-save", "-c", "-t", "filter"], check=True).stdout
    line = next(line for line in saved.splitlines() if line.startswith(":FORWARD "))
    return int(line.split("[")[1].split(":")[0])


def test_the_private_stack_passes_its_lab_check(private_lab: Lab) -> None:
    report = private_lab.probe()
    assert report.ok, [o.probe.describe() for o in report.mismatches]
    # no probe from outside went to a private host: it has no public address to send to
    assert not [o for o in report.outcomes if o.probe.target.host.startswith("db-") and o.probe.target.kind != "private"]


def test_a_private_host_has_only_its_private_interface(private_lab: Lab) -> None:
    links = private_lab.run("db-1", ["ip", "-o", "link", "show"], check=True).stdout
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) == ["eth0", "lo"]
    addresses = private_lab.run("db-1", ["ip", "-o", "-4", "addr", "show", "dev", "eth0"], check=True).stdout
    assert f" {private_lab.addresses['db-1'].private}/" in addresses and len(addresses.splitlines()) == 1
    # a public host keeps both, eth0 public and eth1 private
    links = private_lab.run("web-1", ["ip", "-o", "link", "show"], check=True).stdout
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) == ["eth0", "eth1", "lo"]


def test_a_private_host_reaches_the_internet_through_the_nat_gateway(private_lab: Lab) -> None:
    lab = private_lab
    assert lab.nat is not None
    internet = str(lab.others.internet.address)
    server = subprocess.Popen(lab.in_ns("internet", [sys.executable, "-c", SERVER, internet, str(PORT)]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        # db is `egress: restricted`: the Internet (outside the VPC) is let out of eth0; the Internet sees the
        # gateway's public address, never the private one
        assert connect(lab, "db-1", internet, PORT) == lab.nat.public
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("outsider", ["internet", "operator"])
def test_nothing_from_the_internet_or_the_public_segment_reaches_a_private_host(private_lab: Lab, outsider: str) -> None:
    """Even an outsider that routes the VPC range at the gateway's public address gets nowhere: the gateway
    forwards only the VPC's own connections out, and their replies back."""
    lab = private_lab
    assert lab.nat is not None
    vpc = str(lab.stack.config.vpc_ip_range)
    route = ["ip", "route", "add", vpc, "via", lab.nat.public, "dev", lab.interfaces.public, "onlink"]
    lab.run(outsider, route, check=True)
    try:
        before = forward_drops(lab)
        for port in (22, 5432):  # db admits 5432 from web and 22 from the bastion: never from outside
            assert connect(lab, outsider, lab.addresses["db-1"].private, port, timeout=2).startswith("failed: ")
        assert forward_drops(lab) > before  # the SYNs reached the gateway and were dropped there
    finally:
        lab.run(outsider, ["ip", "route", "del", vpc], check=True)


def test_without_a_nat_gateway_a_private_host_has_no_way_out(run_ids: list[str], tmp_path_factory: pytest.TempPathFactory
                                                              ) -> None:
    doc = stack_document("private")
    doc["config"]["enclave:natGateway"] = False
    path = tmp_path_factory.mktemp("stacks") / "Pulumi.private.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pushed_lab(load_stack_file(path), run_ids) as lab:
        assert lab.nat is None and lab.namespace(NAT) not in lab.namespaces
        assert connect(lab, "db-1", str(lab.others.internet.address), PORT).startswith("failed: ")
        assert lab.probe().ok
