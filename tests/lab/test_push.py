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
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from config.stackfile import load_stack
from enclave import kernelstate
from enclave.plan import build_plan
from enclave.push import UNIT_NAME, baseline_script, cloud_config, confirm_script, digest, push_script
from enclave.render import RuleFiles, baseline_files

from .test_lab import without_rule

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
            # long enough for a confirm on a loaded machine; the rollback tests set their own
            "ENCLAVE_ROLLBACK_SECONDS": "60",
        }

    def sh(self, script: str, check: bool = True, window_s: int | None = None) -> subprocess.CompletedProcess[str]:
        env = self.env if window_s is None else {**self.env, "ENCLAVE_ROLLBACK_SECONDS": str(window_s)}
        result = subprocess.run(
            ["ip", "netns", "exec", self.ns, "sh", "-s"], input=script, text=True, capture_output=True, env=env
        )
        if check and result.returncode != 0:
            raise AssertionError(f"exit {result.returncode}: {result.stderr}")
        return result

    def save(self) -> str:
        """The firewall state in the canonical form the lab and `enclave audit` compare (enclave.kernelstate)."""
        return kernelstate.read_saved(self.sh(kernelstate.SAVE_SH).stdout).render()

    def reboot(self) -> None:
        """A new network namespace is a host whose kernel state is gone; the files on disk stay."""
        subprocess.run(["ip", "netns", "del", self.ns], check=True)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)

    @property
    def state(self) -> Path:
        return self.root / "state"

    def wait_until_settled(self, timeout: float = 60) -> None:
        """Until the pending push is gone: confirmed, or rolled back by its timer."""
        end = time.monotonic() + timeout
        while (self.state / "pending").exists():
            assert time.monotonic() < end, "a push stayed pending past its window"
            time.sleep(0.1)


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
    # no Docker here: DOCKER-USER made as Docker makes it, holding only the hook for published ports
    assert [line for line in rules.splitlines() if "DOCKER-USER" in line] == [
        "-N DOCKER-USER", "-A FORWARD -j DOCKER-USER", "-A DOCKER-USER -j ENCLAVE-FORWARD"]
    assert "-A ENCLAVE-INPUT -s 10.110.16.0/24 -i eth1 -p tcp -m tcp --dport 22" in rules
    # a non-bastion takes nothing on its public interface (published container ports from there are dropped)
    assert [line for line in rules.splitlines() if "eth0" in line] == [
        '-A ENCLAVE-FORWARD -i eth0 -j DROP']
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
    host.sh(push_script(cut, "prod"), window_s=1)
    assert "--dport 22 " not in host.sh("iptables -S ENCLAVE-INPUT").stdout
    host.wait_until_settled()
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


# ------------------------------------------------------------------------------------------ faults, host-local


def cut_ssh(files: RuleFiles) -> RuleFiles:
    return dataclasses.replace(files, ipv4="".join(l for l in files.ipv4.splitlines(keepends=True) if "--dport 22 " not in l))


def test_a_bad_target_only_the_kernel_sees_is_rejected_before_either_family_changes(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    """ip6tables-restore --test on nf_tables accepts `-j NOSUCHTARGET`; the proof in a scratch namespace does not."""
    good = prod_files["mysql-1"]
    push_and_confirm(host, good)
    before = host.save()
    bad = dataclasses.replace(cut_ssh(good), ipv6=good.ipv6.replace('"default drop" -j DROP', '"default drop" -j NOSUCHTARGET'))
    result = host.sh(push_script(bad, "prod"), check=False)
    assert result.returncode == 1
    assert f"enclave push mysql-1: rules {digest(bad)} rejected; nothing was changed" in result.stderr
    assert "IPv6 rules rejected" in result.stderr and "NOSUCHTARGET" in result.stderr
    assert host.save() == before  # the IPv4 change (SSH cut) never went live either


@pytest.fixture
def small_disk(host: Host) -> Iterator[Path]:
    """The state directory on a 1 MiB tmpfs, mounted for this test only and always unmounted."""
    state = host.state
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=700", "enclave-test", str(state)], check=True)
    try:
        yield state
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)
        if subprocess.run(["umount", str(state)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(state)], check=True)


def fill(state: Path) -> None:
    subprocess.run(["dd", "if=/dev/zero", f"of={state / 'filler'}", "bs=4k"], capture_output=True)


def test_a_full_disk_changes_nothing_and_a_retry_converges(host: Host, small_disk: Path, prod_files: dict[str, RuleFiles]) -> None:
    good, new = prod_files["mysql-1"], without_rule(prod_files["mysql-1"], "ssh through bastion tunnel")
    host.sh(baseline("mysql"))
    push_and_confirm(host, good)
    before = host.save()
    fill(small_disk)
    result = host.sh(push_script(new, "prod"), check=False)
    assert result.returncode == 1 and f"enclave push mysql-1: rules {digest(new)}" in result.stderr, result.stderr
    assert "nothing was changed" in result.stderr and "No space left" in result.stderr
    assert host.save() == before and not (small_disk / "pending").exists()
    (small_disk / "filler").unlink()
    # applied, then the disk fills before the confirmation: the confirm only renames, and gets through
    host.sh(push_script(new, "prod"))
    fill(small_disk)
    confirmed = host.sh(confirm_script(new, "prod"), check=False)
    (small_disk / "filler").unlink()
    if confirmed.returncode != 0:  # if it could not, it says so and a retry can
        assert "a retry can confirm them" in confirmed.stderr, confirmed.stderr
        confirmed = host.sh(confirm_script(new, "prod"))
    assert "confirmed over a new connection" in confirmed.stdout
    assert os.readlink(small_disk / "confirmed") == f"rules/{digest(new)}"
    assert (small_disk / "in-force").read_text().strip() == digest(new)


def test_a_rollback_on_a_full_disk_says_what_is_in_force(host: Host, small_disk: Path, prod_files: dict[str, RuleFiles]) -> None:
    good = prod_files["mysql-1"]
    host.sh(baseline("mysql"))
    push_and_confirm(host, good)
    before = host.save()
    host.sh(push_script(cut_ssh(good), "prod"), window_s=1)
    fill(small_disk)
    host.wait_until_settled()
    assert host.save() == before
    late = host.sh(confirm_script(cut_ssh(good), "prod"), check=False)
    assert late.returncode == 1
    message = late.stderr.splitlines()[0]
    assert message.startswith(f"enclave confirm mysql-1: rules {digest(cut_ssh(good))} are not in force: ")
    assert digest(good) in message, message  # what is in force instead, never an empty reason


def test_a_damaged_apply_sh_boots_closed_and_cloud_init_repairs_it(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    host.sh(baseline("mysql"))
    push_and_confirm(host, prod_files["mysql-1"])
    confirmed = host.save()
    apply_sh = host.state / "apply.sh"
    apply_sh.write_text(apply_sh.read_text()[:3000])
    host.reboot()
    unit = (host.root / "units" / UNIT_NAME).read_text()
    assert run_unit(host, unit).returncode != 0
    tables = host.sh("iptables -S; ip6tables -S").stdout
    assert tables.count("-P INPUT DROP") == 2 and tables.count("-P FORWARD DROP") == 2
    host.sh(baseline("mysql"))  # cloud-init's bootcmd, later in the same boot, reinstalls apply.sh
    assert host.save() == confirmed


def test_every_push_refreshes_the_baseline(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    host.sh(baseline("mysql"))
    config = load_stack("prod").config
    moved = dataclasses.replace(baseline_files(config, "mysql"), ipv4=baseline_files(config, "mysql").ipv4.replace(
        "ssh from the VPC until the first push", "ssh from the VPC, refreshed"))
    host.sh(push_script(prod_files["mysql-1"], "prod", baseline=moved))
    assert os.readlink(host.state / "baseline") == f"rules/{digest(moved)}"
    assert "refreshed" in (host.state / "baseline" / "rules.v4").read_text()


def test_a_foreign_ban_chains_jump_stays_ahead_of_enclaves(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    host.sh("iptables -N f2b-sshd && iptables -A f2b-sshd -j RETURN && iptables -N DOCKER-USER\n"
            "iptables -A INPUT -j DOCKER-USER && iptables -A INPUT -p tcp --dport 22 -j f2b-sshd\n")
    push_and_confirm(host, prod_files["mysql-1"])
    jumps = [l.split("-j ")[-1] for l in host.sh("iptables -S INPUT").stdout.splitlines() if "-j " in l]
    assert jumps == ["DOCKER-USER", "f2b-sshd", "ENCLAVE-INPUT"]
    host.sh("iptables -D INPUT -j ENCLAVE-INPUT && iptables -I INPUT 1 -p tcp --dport 80 -j f2b-sshd")
    push_and_confirm(host, prod_files["mysql-1"])
    jumps = [l.split("-j ")[-1] for l in host.sh("iptables -S INPUT").stdout.splitlines() if "-j " in l]
    assert jumps == ["f2b-sshd", "DOCKER-USER", "f2b-sshd", "ENCLAVE-INPUT"]


# --------------------------------------------------------------------------------------------- ssh keys


KEY_OLD = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE9sZC1rZXktZW5jbGF2ZS10ZXN0LTAwMDAwMDAw old@enclave"
KEY_NEW = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE5ldy1rZXktZW5jbGF2ZS10ZXN0LTAwMDAwMDAw new@enclave"
KEY_USERS = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFVzZXJzLWtleS1lbmNsYXZlLXRlc3QtMDAwMDAw alice@laptop"


def test_key_rotation_authorizes_the_new_key_then_removes_only_enclaves_old_one(host: Host, prod_files: dict[str, RuleFiles]) -> None:
    home = host.root / "home"
    (home / ".ssh").mkdir(parents=True)
    keys = home / ".ssh" / "authorized_keys"
    keys.write_text(f"# alice's own\n{KEY_USERS}\n")
    files = prod_files["mysql-1"]

    def run(script: str) -> None:
        result = subprocess.run(["ip", "netns", "exec", host.ns, "sh", "-s"], input=script, text=True,
                                capture_output=True, env={**host.env, "HOME": str(home)})
        assert result.returncode == 0, result.stderr

    run(push_script(files, "prod", ssh_public_key=KEY_OLD))
    run(confirm_script(files, "prod", ssh_public_key=KEY_OLD))
    assert keys.read_text() == f"# alice's own\n{KEY_USERS}\n{KEY_OLD}\n"
    run(push_script(files, "prod", ssh_public_key=KEY_NEW))
    assert keys.read_text() == f"# alice's own\n{KEY_USERS}\n{KEY_OLD}\n{KEY_NEW}\n"  # both work until the confirm
    run(confirm_script(files, "prod", ssh_public_key=KEY_NEW))  # logged in with the new key
    assert keys.read_text() == f"# alice's own\n{KEY_USERS}\n{KEY_NEW}\n"
    run(push_script(files, "prod", ssh_public_key=KEY_NEW))
    run(confirm_script(files, "prod", ssh_public_key=KEY_USERS))  # a key enclave did not write: never removed
    assert keys.read_text() == f"# alice's own\n{KEY_USERS}\n"  # enclave's own line went, alice's stays
    assert oct(keys.stat().st_mode & 0o777) == "0o600"


def test_cloud_config_creates_a_sudo_user_with_the_key_and_raises_maxstartups_on_bastions(host: Host) -> None:
    config = load_stack("prod").config
    data = yaml.safe_load(cloud_config(baseline_files(config, "tunnel"), ssh_user="deploy", ssh_public_key=KEY_NEW, bastion=True))
    default, user = data["users"]
    assert default == "default"  # the image's own users (root with DigitalOcean's keys) stay
    assert user["name"] == "deploy" and user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["ssh_authorized_keys"] == [KEY_NEW]
    assert "users" not in yaml.safe_load(cloud_config(baseline_files(config, "tunnel")))  # root: DigitalOcean's keys
    sshd_dir = host.root / "sshd_config.d"
    result = subprocess.run(["ip", "netns", "exec", host.ns, "sh", "-c", data["bootcmd"][0][2]], text=True,
                            capture_output=True, env={**host.env, "ENCLAVE_SSHD_CONFIG_DIR": str(sshd_dir)})
    assert result.returncode == 0, result.stderr
    assert "MaxStartups 100:30:1000" in (sshd_dir / "enclave.conf").read_text()
    # a non-bastion writes none, and neither does a bastion on a state directory of its own (a lab)
    host.sh(baseline("mysql"))
    host.sh(baseline_script(baseline_files(config, "tunnel"), bastion=True))
    assert list(sshd_dir.iterdir()) == [sshd_dir / "enclave.conf"]
    with pytest.raises(ValueError, match="ssh_public_key"):
        cloud_config(baseline_files(config, "tunnel"), ssh_user="deploy", ssh_public_key="not a key\nsecond line")
