"""The host side of a push, on real netfilter: each test gets a fresh network namespace as "the host".

What needs SSH (a rule that cuts SSH is rolled back; confirm over a new connection) is proven in the lab tests.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from config.stackfile import load_stack
from enclave.lab.lab import normalized_firewall
from enclave.plan import build_plan
from enclave.push import UNIT_NAME, baseline_script, cloud_config, confirm_script, push_script
from enclave.render import RuleFiles, baseline_files

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("iptables-restore") or not shutil.which("ipset"),
    reason="needs root, iptables and ipset (make setup as root installs them)",
)


@dataclasses.dataclass
class Host:
    """A namespace standing in for a droplet, with its own enclave state directory."""

    ns: str
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ENCLAVE_STATE_DIR": str(self.root / "state"),
            "ENCLAVE_SYSTEMD_DIR": str(self.root / "units"),
            "ENCLAVE_ROLLBACK_SECONDS": "1",
        }

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ip", "netns", "exec", self.ns, "sh", "-s"], input=script, text=True, capture_output=True, env=self.env
        )
        if check and result.returncode != 0:
            raise AssertionError(f"exit {result.returncode}: {result.stderr}")
        return result

    def save(self) -> str:
        """The firewall state, normalized exactly as the lab compares it."""
        return normalized_firewall(self.sh("iptables-save; ip6tables-save").stdout, self.sh("ipset save").stdout)

    def reboot(self) -> None:
        """A new network namespace is a host whose kernel state is gone; the files on disk stay."""
        subprocess.run(["ip", "netns", "del", self.ns], check=True)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)

    @property
    def state(self) -> Path:
        return self.root / "state"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    ns = f"enc-push-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield Host(ns, tmp_path)
    finally:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:  # the rollback timer, if still sleeping
            subprocess.run(["kill", "-9", pid], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="module")
def prod_files() -> dict[str, RuleFiles]:
    return build_plan(load_stack("prod")).files


def baseline(role: str) -> str:
    return baseline_script(baseline_files(load_stack("prod").config, role))


def run_unit(host: Host, unit: str) -> subprocess.CompletedProcess[str]:
    """ExecStart as systemd runs it: only the unit's Environment= (no ENCLAVE_STATE_DIR of the test's own), `$$`
    unescaped to `$`."""
    lines = unit.splitlines()
    exec_start = next(line.split("=", 1)[1] for line in lines if line.startswith("ExecStart=")).replace("$$", "$")
    env = [line.split("=", 1)[1] for line in lines if line.startswith("Environment=")]
    argv = ["ip", "netns", "exec", host.ns, "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *env, *shlex.split(exec_start)]
    return subprocess.run(argv, text=True, capture_output=True)


def push_and_confirm(host: Host, files: RuleFiles) -> None:
    host.sh(push_script(files, "prod"))
    assert "confirmed" in host.sh(confirm_script(files, "prod")).stdout


def test_baseline_boots_closed_but_reachable_for_the_first_push(host: Host) -> None:
    host.sh(baseline("mysql"))
    rules = host.sh("iptables -S").stdout
    assert "-P INPUT DROP" in rules and "-P FORWARD DROP" in rules
    assert "-A ENCLAVE-INPUT -s 10.110.16.0/24 -i eth1 -p tcp -m tcp --dport 22" in rules
    assert "eth0" not in rules  # a non-bastion takes nothing on its public interface
    tunnel = Host(host.ns, host.root / "tunnel")
    tunnel.sh(baseline("tunnel"))
    assert "-A ENCLAVE-INPUT -s 198.51.100.7/32 -i eth0 -p tcp -m tcp --dport 22" in host.sh("iptables -S").stdout
    assert "-P INPUT DROP" in host.sh("ip6tables -S").stdout


def test_cloud_config_runs_the_baseline_on_boot(host: Host) -> None:
    user_data = cloud_config(baseline_files(load_stack("prod").config, "mysql"))
    assert user_data.startswith("#cloud-config\n")
    bootcmd = yaml.safe_load(user_data)["bootcmd"]
    assert bootcmd[0][:2] == ["sh", "-c"]
    host.sh(bootcmd[0][2])
    assert "baseline: ssh from the VPC" in host.sh("iptables -S ENCLAVE-INPUT").stdout


def test_pushing_the_same_rules_twice_changes_nothing(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    host.sh(baseline("mysql"))
    push_and_confirm(host, prod_files["mysql-1"])
    first = host.save()
    assert re.search(r"--match-set enclave-wordpress\.[0-9a-z]{3} src", first)
    push_and_confirm(host, prod_files["mysql-1"])
    assert host.save() == first


def test_foreign_chains_and_tables_survive_a_push(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    host.sh(
        "iptables -N DOCKER-USER && iptables -A DOCKER-USER -j RETURN && iptables -A FORWARD -j DOCKER-USER\n"
        "iptables -N f2b-sshd && iptables -A f2b-sshd -s 192.0.2.66 -j REJECT && iptables -I INPUT -p tcp --dport 22 -j f2b-sshd\n"
        "iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE\n"
    )
    push_and_confirm(host, prod_files["mysql-1"])
    rules = host.sh("iptables-save").stdout
    for survivor in ("-A FORWARD -j DOCKER-USER", "-A f2b-sshd -s 192.0.2.66/32 -j REJECT", "-A POSTROUTING -o eth0 -j MASQUERADE"):
        assert survivor in rules, survivor
    assert rules.count("-j ENCLAVE-INPUT") == 1


def test_an_invalid_rule_file_changes_nothing(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    good = prod_files["mysql-1"]
    push_and_confirm(host, good)
    before = host.save()
    bad = dataclasses.replace(good, ipv4=good.ipv4.replace("--dport 3306", "--dport 99999"))
    result = host.sh(push_script(bad, "prod"), check=False)
    assert result.returncode != 0 and "rejected; nothing was changed" in result.stderr
    assert host.save() == before
    assert not (host.state / "pending").exists()


def test_an_unconfirmed_push_rolls_back_to_the_confirmed_rules(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    good = prod_files["mysql-1"]
    push_and_confirm(host, good)
    confirmed = host.save()
    # a push whose rules would forget the bastion: nobody confirms it
    cut = dataclasses.replace(good, ipv4="\n".join(l for l in good.ipv4.splitlines() if "--dport 22 " not in l) + "\n")
    host.sh(push_script(cut, "prod"))
    assert "--dport 22 " not in host.sh("iptables -S ENCLAVE-INPUT").stdout
    subprocess.run(["sleep", "2.5"], check=True)
    assert host.save() == confirmed
    late = host.sh(confirm_script(cut, "prod"), check=False)
    assert late.returncode == 1 and "rolled back" in late.stderr


def test_a_reboot_restores_the_confirmed_rules_exactly(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    host.sh(baseline("mysql"))
    push_and_confirm(host, prod_files["mysql-1"])
    confirmed = host.save()
    host.reboot()
    assert "ENCLAVE" not in host.sh("iptables-save").stdout
    unit = (host.root / "units" / UNIT_NAME).read_text()
    assert "Before=network-pre.target" in unit
    run_unit(host, unit)
    assert host.save() == confirmed


def test_a_reboot_before_any_push_restores_the_baseline(host: Host) -> None:
    host.sh(baseline("mysql"))
    booted = host.save()
    host.reboot()
    host.sh(f"sh {host.state}/apply.sh --restore")
    assert host.save() == booted


def test_restricted_egress_drops_new_outbound_on_the_private_interface(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    push_and_confirm(host, prod_files["haproxy-www-1"])
    rules = host.sh("iptables -S").stdout
    assert "-P OUTPUT DROP" in rules
    assert re.search(r"-A ENCLAVE-OUTPUT -o eth1 -p tcp -m tcp --dport 80 -m set --match-set enclave-wordpress\.[0-9a-z]{3} dst", rules)
