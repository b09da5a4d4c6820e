"""Safe apply in the lab: real sshd, the real OpenSSH client through the bastion, real netfilter.

What an operator checks after each kind of push: a push that cuts SSH rolls back by itself and the late
confirmation says so; a bad file changes nothing; the same push twice changes nothing; other tools' chains
survive; a host that is down fails only its own push; IPv6 neighbour discovery survives a push (and the test
sees it when it does not). test_push.py proves the same script host-locally; here it goes over SSH.

One dev-sized lab, with haproxy-www on IPv6 and a short rollback window, is shared by the tests that put their
host back as they found it; the down-host test needs a lab of its own.
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
from collections.abc import Iterator

import pytest

from config.stackfile import Stack, load_stack
from enclave.lab.lab import Lab, PushFailed
from enclave.lab.progress import PlainProgress
from enclave.push import confirm_script, digest, push_script
from enclave.render import ICMPV6_ND, RuleFiles

from ..conftest import pushed_lab, send_one
from .test_lab import _unavailable, without_rule

pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=f"lab unavailable: {_unavailable()}")

# The rollback window of these labs (the program's is 90 s). Long enough for a confirmation to arrive on a busy
# machine (it takes ~0.3 s), short enough that waiting out a rollback costs a few seconds.
WINDOW_S = 4



@pytest.fixture(scope="module")
def lab(run_ids: list[str], dev6: Stack) -> Iterator[Lab]:
    with pushed_lab(dev6, run_ids, host_env={"ENCLAVE_ROLLBACK_SECONDS": str(WINDOW_S)}) as lab:
        yield lab


def confirmed_digest(lab: Lab, host: str) -> str | None:
    path = lab.state_dir(host) / "confirmed" / "digest"
    return path.read_text().strip() if path.exists() else None


def reachable(lab: Lab, host: str) -> bool:
    """A NEW SSH connection from the operator, through the bastion, gets a shell on the host."""
    return lab.ssh(host, "true", timeout=30).returncode == 0


def forget_neighbours(lab: Lab, *names: str) -> None:
    """Empty the neighbour caches, so the next IPv6 packet needs neighbour discovery again."""
    for name in names:
        lab.run(name, ["ip", "-6", "neigh", "flush", "all"], check=True)


def nd_counters(lab: Lab, host: str) -> dict[str, int]:
    """Packets matched by each neighbour-discovery accept rule of ENCLAVE-INPUT (ip6tables -vnxL)."""
    numbers = {"133": "router-solicitation", "134": "router-advertisement",
               "135": "neighbour-solicitation", "136": "neighbour-advertisement"}
    listing = lab.console(host, "ip6tables -w -vnxL ENCLAVE-INPUT").stdout
    counters = {}
    for line in listing.splitlines():
        match = re.search(r"ipv6-icmptype (13[3-6])\b", line)
        if match and "ACCEPT" in line:
            counters[numbers[match.group(1)]] = int(line.split()[0])
    assert set(counters) == set(ICMPV6_ND), listing
    return counters


# ------------------------------------------------------------------------------------------- lock-out


def test_a_push_that_cuts_ssh_from_the_bastion_rolls_back_and_the_host_is_reachable_again(lab: Lab) -> None:
    confirmed = lab.firewall_state("mysql-1")
    cut = without_rule(lab.files["mysql-1"], "ssh through bastion tunnel")
    # The confirmation keeps dialing as pulumi-command does; it only gets in once the host rolled back.
    with pytest.raises(PushFailed) as failed:
        lab.push("mysql-1", cut, redial_s=WINDOW_S + 15)
    message = str(failed.value)
    assert failed.value.step == "confirm"
    assert "confirm to mysql-1 failed" in message and f"rules {digest(cut)}" in message
    assert f"were rolled back after {WINDOW_S} s without confirmation" in message
    assert reachable(lab, "mysql-1")
    assert lab.firewall_state("mysql-1") == confirmed
    assert confirmed_digest(lab, "mysql-1") == digest(lab.files["mysql-1"])


def test_a_reboot_before_the_confirmation_drops_the_unconfirmed_rules(lab: Lab) -> None:
    """The operator reboots a host whose new rules cut SSH, before the confirmation: the host boots on its
    confirmed rules, and the still-dialing confirmation, which now gets in, must not make the cut rules the
    ones every later boot restores."""
    host = "wordpress-1"
    confirmed = lab.firewall_state(host)
    cut = without_rule(lab.files[host], "ssh through bastion tunnel")
    pushed = lab.ssh(host, input=push_script(cut, lab.stack.name))  # the program's first command
    assert pushed.returncode == 0, pushed.stderr
    lab.reboot(host)  # within the window (WINDOW_S): the rollback timer dies with the host
    assert "restarted" in (lab.state_dir(host) / "rolled-back").read_text()  # not the timer: the reboot
    assert lab.firewall_state(host) == confirmed
    late = lab.ssh(host, input=confirm_script(cut, lab.stack.name))
    assert late.returncode == 1 and f"enclave confirm {host}: rules {digest(cut)} are not in force" in late.stderr
    assert confirmed_digest(lab, host) == digest(lab.files[host])
    lab.reboot(host)  # and the next boot still restores the rules that were confirmed
    assert lab.firewall_state(host) == confirmed and reachable(lab, host)


def test_an_earlier_pushs_timer_never_rolls_back_a_later_push_of_the_same_rules(lab: Lab) -> None:
    """Rules A, then B, then A again (a revert) within A's first window: when that window ends, A's first timer
    must leave the second push of A alone (it waits for its own confirmation), not restore B over it."""
    host, a = "wordpress-1", lab.files["wordpress-1"]
    b = without_rule(a, "roles.wordpress.ingress[0]")
    applied = lab.firewall_state(host)

    def push(files: RuleFiles, window_s: int) -> None:
        pushed = lab.ssh(host, f"ENCLAVE_ROLLBACK_SECONDS={window_s} sh -s", input=push_script(files, lab.stack.name))
        assert pushed.returncode == 0, pushed.stderr

    push(a, 1)
    assert lab.ssh(host, input=confirm_script(a, lab.stack.name)).returncode == 0
    push(b, 60)
    assert lab.ssh(host, input=confirm_script(b, lab.stack.name)).returncode == 0
    push(a, 60)
    time.sleep(1.5)  # A's first timer wakes up while the revert to A is pending
    confirmed = lab.ssh(host, input=confirm_script(a, lab.stack.name))
    assert confirmed.returncode == 0 and "confirmed over a new connection" in confirmed.stdout, confirmed.stderr
    assert not (lab.state_dir(host) / "rolled-back").exists()
    assert lab.firewall_state(host) == applied and confirmed_digest(lab, host) == digest(a)


# ------------------------------------------------------------------------------------ apply is atomic


@pytest.mark.parametrize("part", ["rules.v4", "rules.v6", "ipsets"])
def test_a_push_with_an_invalid_file_changes_nothing_and_says_so(lab: Lab, part: str) -> None:
    good = lab.files["mysql-1"]
    wordpress = lab.addresses["wordpress-1"].private
    bad = {
        "rules.v4": dataclasses.replace(good, ipv4=good.ipv4.replace("--dport 3306", "--dport 99999")),
        "rules.v6": dataclasses.replace(good, ipv6=good.ipv6.replace("--ctstate INVALID", "--ctstate INVALID-ISH")),
        "ipsets": dataclasses.replace(good, ipsets=good.ipsets.replace(f" {wordpress}\n", " 10.120.0.300\n")),
    }[part]
    assert bad != good
    before = lab.firewall_state("mysql-1")
    with pytest.raises(PushFailed) as failed:
        lab.push("mysql-1", bad)
    assert failed.value.step == "push"
    message = str(failed.value)
    assert f"enclave push mysql-1: rules {digest(bad)} rejected; nothing was changed" in message
    rejected = {"rules.v4": "IPv4 rules rejected", "rules.v6": "IPv6 rules rejected", "ipsets": "ipset definitions rejected"}
    assert rejected[part] in message
    assert lab.firewall_state("mysql-1") == before
    assert not (lab.state_dir("mysql-1") / "pending").exists()  # no rollback armed: nothing to roll back
    assert reachable(lab, "mysql-1")


def test_pushing_the_same_rules_again_leaves_iptables_save_unchanged(lab: Lab) -> None:
    for host in lab.files:
        before = lab.firewall_state(host)
        output = lab.push(host)  # over SSH, through the bastion, confirmed over a new connection
        assert f"applied rules {digest(lab.files[host])}" in output and "confirmed over a new connection" in output
        assert lab.firewall_state(host) == before, host


def test_other_tools_chains_and_tables_survive_a_push(lab: Lab) -> None:
    host = "wordpress-1"
    foreign = (
        # Docker's way (moby iptables.go NewChain, EnsureJumpRule): DOCKER-USER only if missing (enclave hooks
        # published ports there), its FORWARD jump moved to the top
        "{ iptables -w -n -L DOCKER-USER >/dev/null 2>&1 || iptables -w -N DOCKER-USER; } && iptables -w -A DOCKER-USER -j RETURN"
        " && { iptables -w -D FORWARD -j DOCKER-USER 2>/dev/null; iptables -w -I FORWARD -j DOCKER-USER; }\n"
        "iptables -w -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n"
        "iptables -w -N f2b-sshd && iptables -w -A f2b-sshd -s 192.0.2.66/32 -j REJECT && iptables -w -A f2b-sshd -j RETURN\n"
        "iptables -w -I INPUT -p tcp -m tcp --dport 22 -j f2b-sshd\n"
        "ip6tables -w -N f2b-sshd && ip6tables -w -A f2b-sshd -s 2001:db8:66::/48 -j REJECT\n"
    )
    survivors = (
        "-A FORWARD -j DOCKER-USER",
        "-A DOCKER-USER -j RETURN",
        "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
        "-A INPUT -p tcp -m tcp --dport 22 -j f2b-sshd",
        "-A f2b-sshd -s 192.0.2.66/32 -j REJECT",
        "-A f2b-sshd -s 2001:db8:66::/48 -j REJECT",
    )

    def not_ours(state: str) -> list[str]:
        return [line for line in state.splitlines() if "ENCLAVE" not in line and "enclave-" not in line]

    original = lab.files[host]
    changed = without_rule(original, "roles.wordpress.ingress[0]")  # a real change to enclave's own chain
    lab.console(host, foreign)
    try:
        before = lab.firewall_state(host)
        assert all(line in before for line in survivors)
        lab.push(host, changed)
        after_change = lab.firewall_state(host)
        assert "roles.wordpress.ingress[0]" not in after_change and "roles.wordpress.ingress[0]" in before
        lab.push(host, original)
        after = lab.firewall_state(host)
    finally:
        lab.push(host, original)
        lab.console(host, "iptables -w -D FORWARD -j DOCKER-USER; iptables -w -D INPUT -p tcp -m tcp --dport 22 -j f2b-sshd\n"
                    "iptables -w -F DOCKER-USER; iptables -w -X DOCKER-USER; iptables -w -F f2b-sshd; iptables -w -X f2b-sshd\n"
                    "iptables -w -t nat -F POSTROUTING; ip6tables -w -F f2b-sshd; ip6tables -w -X f2b-sshd\n", check=False)
    assert not_ours(after_change) == not_ours(before)  # every line that is not enclave's, unchanged
    assert after == before
    assert after.count("-j ENCLAVE-INPUT") == 2  # one jump from INPUT per family, not one more per push


# ------------------------------------------------------------------------------------------- ipv6


def test_ipv6_neighbour_discovery_still_works_after_a_push(lab: Lab) -> None:
    host = "haproxy-www-1"
    lab.push(host)  # counters start from zero with the chain the push rebuilt
    forget_neighbours(lab, "internet", host)
    outcome = send_one(lab, "internet", host, "public6", "tcp/80")
    assert outcome.passed, outcome.describe()
    counters = nd_counters(lab, host)
    # the Internet had to ask for haproxy-www-1's link-layer address, and the accept rule let it in
    assert counters["neighbour-solicitation"] > 0, counters


def test_without_the_neighbour_discovery_rules_ipv6_breaks_while_ipv4_works(lab: Lab) -> None:
    """The converse of the test above, so it can fail: drop neighbour discovery and the same probe fails."""
    host = "haproxy-www-1"
    files = lab.files[host]
    no_nd = dataclasses.replace(
        files, ipv6="".join(line for line in files.ipv6.splitlines(keepends=True) if not any(t in line for t in ICMPV6_ND))
    )
    assert no_nd.ipv6 != files.ipv6
    try:
        lab.push(host, no_nd)  # confirmed: SSH is IPv4, so this mistake does not lock anyone out
        forget_neighbours(lab, "internet", host)
        v6 = send_one(lab, "internet", host, "public6", "tcp/80")
        v4 = send_one(lab, "internet", host, "public", "tcp/80")
    finally:
        lab.push(host)
    assert not v6.passed, v6.describe()
    assert v4.passed, v4.describe()


# ------------------------------------------------------------------------------------------ a host down


def test_a_host_that_is_down_fails_only_its_own_push(run_ids: list[str]) -> None:
    phases = io.StringIO()
    with Lab(load_stack("dev"), progress=PlainProgress(phases)) as lab:
        run_ids.append(lab.run_id)
        lab.console("mysql-1", f'kill "$(cat {lab.host_dir("mysql-1")}/sshd.pid)"')  # its sshd is gone
        failures = lab.push_all()
        confirmed = {host: confirmed_digest(lab, host) for host in lab.files}
        expected = {host: digest(files) for host, files in lab.files.items()}
        mysql_rules = lab.console("mysql-1", "iptables -S ENCLAVE-INPUT").stdout
    assert list(failures) == ["mysql-1"]
    failure = failures["mysql-1"]
    assert failure.step == "push" and "push to mysql-1 failed (exit 255)" in str(failure)
    assert "SSH could not reach mysql-1" in str(failure)
    # every other host got its first push and its confirmation over a new connection
    assert {h: d for h, d in confirmed.items() if h != "mysql-1"} == {h: d for h, d in expected.items() if h != "mysql-1"}
    assert confirmed["mysql-1"] is None and "baseline: ssh from the VPC" in mysql_rules  # still closed, on its baseline
    # the progress lines of a non-terminal (CI logs): one per phase, the failed host named
    lines = phases.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["network", "boot", "push"]
    assert "3 of 4 hosts pushed and confirmed over SSH; FAILED: mysql-1 (push)" in lines[2]
