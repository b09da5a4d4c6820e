"""A stock droplet image, host-local: no `ipset` (every stock image), no `iptables` (Debian), `nft` everywhere.

Each test's host is a fresh network namespace running the real generated scripts on an emulated stock image
(tests/lab/stock_image: /usr/sbin without the missing packages' commands, a pretend apt-get and mirror). What a
user checks: the first boot is closed at once and reachable for the first push, the install brings the full
baseline, the first push succeeds, a push that arrives mid-install waits for it, and with no way to install,
the host stays closed (or, with no packet filter tool at all, says it is OPEN).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from config.stackfile import load_stack
from enclave.plan import build_plan
from enclave.push import baseline_script, cloud_config, confirm_script, digest, install_script, push_script
from enclave.render import RuleFiles, baseline_files

from .stock_image import installed, make_view, prefix, stock_file

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("iptables-restore", "ipset", "nft")),
    reason="needs root, iptables, ipset and nft (make setup as root installs them)",
)


class StockHost:
    """A namespace standing in for a fresh droplet of a stock image, with its own enclave state directory."""

    def __init__(self, root: Path, missing: tuple[str, ...], mirror: str = "up") -> None:
        self.ns = f"enc-stock-{uuid.uuid4().hex[:8]}"
        self.root = root
        self.view = make_view(root, missing, mirror)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ENCLAVE_STATE_DIR": str(self.root / "state"),
               "ENCLAVE_SYSTEMD_DIR": str(self.root / "units"), "ENCLAVE_ROLLBACK_SECONDS": "60"}
        result = subprocess.run(["ip", "netns", "exec", self.ns, *prefix(self.view), "sh", "-s"], input=script,
                                text=True, capture_output=True, env=env, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"exit {result.returncode}: {result.stderr}")
        return result

    def kernel(self, argv: list[str]) -> str:
        """What the kernel holds, read with this machine's tools (the image may lack them)."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], text=True, capture_output=True, check=True).stdout

    def state(self, name: str) -> str:
        return (self.root / "state" / name).read_text().strip()

    def close(self) -> None:
        for pid in subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)  # a rollback timer still sleeping
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


@pytest.fixture
def stock(tmp_path: Path) -> Iterator[type[StockHost]]:
    hosts: list[StockHost] = []

    def make(missing: tuple[str, ...] = ("ipset",), mirror: str = "up") -> StockHost:
        hosts.append(StockHost(tmp_path / f"host{len(hosts)}", missing, mirror))
        return hosts[-1]

    yield make  # type: ignore[misc]
    for h in hosts:
        h.close()


@pytest.fixture(scope="module")
def prod_files() -> dict[str, RuleFiles]:
    return build_plan(load_stack("prod")).files


def first_boot(host: StockHost, role: str = "mysql") -> None:
    """cloud-init's bootcmd (init stage): the baseline, with whatever the image has."""
    host.sh(baseline_script(baseline_files(load_stack("prod").config, role)), check=False)


def push(host: StockHost, files: RuleFiles) -> subprocess.CompletedProcess[str]:
    return host.sh(push_script(files, "prod", install_wait_s=120), check=False)


def test_ubuntu_without_ipset_boots_on_its_baseline_and_the_first_push_installs_ipset(stock, prod_files) -> None:  # type: ignore[no-untyped-def]
    host = stock(("ipset",))
    first_boot(host)
    baseline = baseline_files(load_stack("prod").config, "mysql")
    # the baseline has no sets: it is in force at once, without ipset
    assert host.state("in-force") == digest(baseline)
    assert "baseline: ssh from the VPC" in host.kernel(["iptables", "-S", "ENCLAVE-INPUT"])
    assert not installed(host.view, "ipset")
    result = push(host, prod_files["mysql-1"])
    assert result.returncode == 0, result.stderr
    assert installed(host.view, "ipset")
    assert "confirmed" in host.sh(confirm_script(prod_files["mysql-1"], "prod")).stdout
    assert host.state("in-force") == digest(prod_files["mysql-1"])
    assert "enclave-wordpress" in host.kernel(["ipset", "list", "-n"])


def test_debian_without_iptables_boots_closed_by_nft_then_runcmd_installs_and_applies_the_baseline(stock) -> None:  # type: ignore[no-untyped-def]
    host = stock(("ipset", "iptables"))
    first_boot(host)
    # closed, by nftables, with the baseline's SSH line translated; honest about it
    assert host.state("in-force") == "closed"
    ruleset = host.kernel(["nft", "list", "table", "inet", "enclave_closed"])
    assert "policy drop" in ruleset
    assert 'iifname "eth1" ip saddr 10.110.16.0/24 tcp dport 22 accept' in ruleset
    # runcmd (final stage): the pretend mirror installs both packages, and the full baseline replaces the table
    runcmd = yaml.safe_load(cloud_config(baseline_files(load_stack("prod").config, "mysql")))["runcmd"]
    assert runcmd == [["sh", "-c", install_script()]]
    result = host.sh(install_script(), check=False)
    assert result.returncode == 0, result.stderr
    assert installed(host.view, "iptables-restore") and installed(host.view, "ipset")
    assert host.state("in-force") == digest(baseline_files(load_stack("prod").config, "mysql"))
    assert "enclave_closed" not in host.kernel(["nft", "list", "tables"])
    assert "baseline: ssh from the VPC" in host.kernel(["iptables", "-S", "ENCLAVE-INPUT"])


def test_with_no_mirror_the_push_names_each_missing_command_and_changes_nothing(stock, prod_files) -> None:  # type: ignore[no-untyped-def]
    host = stock(("ipset",), mirror="down")
    first_boot(host)
    before = host.kernel(["iptables", "-S"])
    result = push(host, prod_files["mysql-1"])
    assert result.returncode == 1
    assert "ipset (package ipset)" in result.stderr and "nothing was changed" in result.stderr
    assert "install.log" in result.stderr  # where apt-get said why
    assert host.kernel(["iptables", "-S"]) == before
    # still closed on its baseline, and reachable: the SSH line from the VPC is there
    assert host.state("in-force") == digest(baseline_files(load_stack("prod").config, "mysql"))


def test_debian_with_no_mirror_stays_closed_by_nft(stock, prod_files) -> None:  # type: ignore[no-untyped-def]
    host = stock(("ipset", "iptables"), mirror="down")
    first_boot(host)
    result = push(host, prod_files["mysql-1"])
    assert result.returncode == 1
    assert "iptables-restore (package iptables)" in result.stderr and "ipset (package ipset)" in result.stderr
    assert host.state("in-force") == "closed"
    assert "policy drop" in host.kernel(["nft", "list", "table", "inet", "enclave_closed"])


def test_with_no_packet_filter_tool_at_all_the_host_says_it_is_open(stock) -> None:  # type: ignore[no-untyped-def]
    host = stock(("ipset", "iptables", "nftables"), mirror="down")
    result = host.sh(baseline_script(baseline_files(load_stack("prod").config, "mysql")), check=False)
    assert result.returncode != 0
    assert "THE HOST IS OPEN" in result.stderr
    assert host.state("in-force").startswith("OPEN")
    assert "apt-get install iptables" in host.state("in-force")
    assert "closed" not in host.state("in-force")


def test_a_push_that_arrives_during_the_first_boot_install_waits_for_it(stock, prod_files) -> None:  # type: ignore[no-untyped-def]
    host = stock(("ipset",))
    first_boot(host)
    hold, calls = stock_file(host.view, "hold"), stock_file(host.view, "calls")
    hold.touch()
    runcmd: dict[str, subprocess.CompletedProcess[str]] = {}
    install = threading.Thread(target=lambda: runcmd.setdefault("r", host.sh(install_script(), check=False)))
    install.start()
    end = time.monotonic() + 60
    while not calls.read_text():  # cloud-init's apt-get has started (and is held)
        assert time.monotonic() < end, "the first-boot install never called apt-get"
        time.sleep(0.05)
    pushed: dict[str, subprocess.CompletedProcess[str]] = {}
    pusher = threading.Thread(target=lambda: pushed.setdefault("r", push(host, prod_files["mysql-1"])))
    pusher.start()
    pusher.join(timeout=1.0)
    assert pusher.is_alive(), "the push did not wait for the install"
    hold.unlink()
    install.join(timeout=120)
    pusher.join(timeout=120)
    assert runcmd["r"].returncode == 0, runcmd["r"].stderr
    assert pushed["r"].returncode == 0, pushed["r"].stderr
    # one install: the push found ipset there once the lock was its own
    assert sum(1 for line in calls.read_text().splitlines() if " install " in f" {line} ") == 1
    assert "confirmed" in host.sh(confirm_script(prod_files["mysql-1"], "prod")).stdout
