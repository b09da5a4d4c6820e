"""Never open, whatever fails: the host side of a push under faults, in the lab (real sshd, the real OpenSSH
client through the bastion, real netfilter, a 4 s rollback window).

Faults: kill -9 at each step of push, confirm and restore (apply.sh's `checkpoint` test hook, a no-op unless
ENCLAVE_TEST_KILL_AT names the step), a reboot at each step, damaged state files of every kind, interleaved and
concurrent pushes, a jump to enclave's chain flushed by hand next to a fail2ban-like ban chain. After each, real
packets from every source (the neighbour and the bastion among them) show that nothing outside the old or the
new rules (or the baseline, where the host falls back to it) is admitted; once the window has passed, a new SSH
connection from the bastion gets in, and the rules in force are the proven ones.

The change pushed ("B") both removes the rule admitting haproxy-www on tcp/80 and adds the neighbour to the
haproxy-www set: neither the old rules nor B admit the neighbour on tcp/80, but B's set members under the old
rules would. So a push that ever mixed them shows as an admitted packet.

`make test` runs a representative subset; `make test-faults-long` (ENCLAVE_FAULTS_LONG=1) runs every step.
The full disk is host-local (tests/lab/test_push.py): it needs no SSH.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator

import pytest

from config.stackfile import Stack
from enclave.ipsets import base_name, landed_name, parse_ipsets
from enclave.lab.lab import WIPE_KERNEL_STATE, Lab
from enclave.lab.probe import Outcome, plan_probes, send_probes
from enclave.push import baseline_script, confirm_script, digest, push_script
from enclave.render import RuleFiles, baseline_files

from ..conftest import pushed_lab
from .test_lab import _unavailable, without_rule

pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=f"lab unavailable: {_unavailable()}")

WINDOW_S = 4
HOST = "wordpress-1"
LONG = os.environ.get("ENCLAVE_FAULTS_LONG") == "1"
PUSH_STEPS = ["push:locked", "push:proven", "push:armed", "push:staged", "apply:sets", "apply:v4", "apply:v6",
              "push:applied", "push:pending"]
# the steps `make test` runs; the others only with `make test-faults-long`
SHORT = {"push:armed", "apply:sets", "apply:v4", "push:pending", "confirm:promoted", "restore:closed"}


def steps(names: list[str]) -> list[object]:
    return [n if n in SHORT or LONG else pytest.param(n, marks=pytest.mark.skip(reason="make test-faults-long"))
            for n in names]



@pytest.fixture(scope="module")
def lab(run_ids: list[str], dev6: Stack) -> Iterator[Lab]:
    with pushed_lab(dev6, run_ids, host_env={"ENCLAVE_ROLLBACK_SECONDS": str(WINDOW_S)}) as lab:
        yield lab


@dataclasses.dataclass
class Rules:
    old: RuleFiles
    new: RuleFiles
    old_state: str
    new_state: str
    baseline_digest: str


def with_member(files: RuleFiles, base: str, member: str) -> RuleFiles:
    """files with one more member in the set `base`, under the generation name the renderer would give it."""
    old_name = next(name for name in files.set_names if base_name(name) == base)
    definition, members = parse_ipsets(files.ipsets)[old_name]
    new_name = landed_name(base, definition, (*members, member))
    return dataclasses.replace(
        files,
        ipv4=files.ipv4.replace(f"--match-set {old_name} ", f"--match-set {new_name} "),
        ipsets=files.ipsets.replace(f" {old_name} ", f" {new_name} ") + f"add {new_name} {member}\n",
        set_names=tuple(new_name if name == old_name else name for name in files.set_names),
    )


@pytest.fixture(scope="module")
def rules(lab: Lab) -> Rules:
    old = lab.files[HOST]
    neighbor = lab.others.neighbor.address
    assert neighbor is not None
    haproxy = lab.addresses["haproxy-www-1"].private
    new = without_rule(old, "roles.wordpress.ingress[0]")
    new = with_member(new, "enclave-haproxy-www", neighbor)
    assert haproxy in new.ipsets and neighbor in new.ipsets
    old_state = lab.firewall_state(HOST)
    lab.push(HOST, new)
    new_state = lab.firewall_state(HOST)
    lab.push(HOST, old)
    assert lab.firewall_state(HOST) == old_state
    base = baseline_files(lab.stack.config, lab.policy.host_by_name[HOST].role)
    return Rules(old, new, old_state, new_state, digest(base))


def state(lab: Lab, name: str) -> str | None:
    path = lab.state_dir(HOST) / name
    if path.is_symlink():
        return os.readlink(path).removeprefix("rules/")
    return path.read_text().strip() if path.exists() else None


def wait_until_settled(lab: Lab, timeout: float = WINDOW_S + 30) -> None:
    """Until no push is pending: its confirm or its timer acted. (A timer still sleeping then is harmless: it
    acts only if "pending" holds its own token, and tokens are never reused.)"""
    end = time.monotonic() + timeout
    while (lab.state_dir(HOST) / "pending").exists():
        assert time.monotonic() < end, "a push stayed pending past its window"
        time.sleep(0.2)


def probe_host(lab: Lab) -> list[Outcome]:
    """Every probe to HOST from every host and outsider (the neighbour and the bastion among them)."""
    probes = [p for p in plan_probes(lab.policy, lab.addresses, lab.others).probes if p.target.host == HOST]
    agents = {p.source.name: str(lab.agent_socket(p.source.name)) for p in probes}
    return send_probes(agents, probes)


def ssh_from_the_private_network(outcome: Outcome) -> bool:
    """What the baseline admits besides the old rules: SSH on the private interface from the VPC."""
    return str(outcome.probe.port) == "tcp/22" and outcome.probe.target.kind == "private"


def assert_nothing_else_admitted(lab: Lab, baseline: bool = False) -> None:
    """The new rules admit a subset of the old ones, so a packet the old policy refuses must not get through
    (with `baseline`, SSH from the VPC may: the host fell back to its baseline)."""
    extra: Callable[[Outcome], bool] = ssh_from_the_private_network if baseline else (lambda o: False)
    wrong = [o.describe() for o in probe_host(lab) if o.passed and o.probe.expected is None and not extra(o)]
    assert not wrong, wrong


def assert_proven(lab: Lab, rules: Rules, files: RuleFiles) -> None:
    """Once the window has passed: a new SSH connection from the bastion gets in, nothing is pending, and what
    is in force is exactly the confirmed rules."""
    wait_until_settled(lab)
    assert lab.ssh(HOST, "true", timeout=30).returncode == 0
    assert state(lab, "confirmed") == digest(files) == state(lab, "in-force")
    expected = rules.old_state if files == rules.old else rules.new_state
    assert lab.firewall_state(HOST) == expected


@pytest.fixture(autouse=True)
def back_on_the_old_rules(lab: Lab, rules: Rules) -> Iterator[None]:
    yield
    try:
        wait_until_settled(lab)
    except AssertionError:  # the test failed with a push left pending: a boot (below) voids it
        lab.console(HOST, f"rm -f {lab.state_dir(HOST)}/pending")
    for marker in lab.state_dir(HOST).glob("test-killed-at-*"):
        marker.rmdir()
    if lab.ssh(HOST, "true", timeout=30).returncode != 0:  # a test that left it on the closed rules: the console
        lab.console(HOST, baseline_script(baseline_files(lab.stack.config, "wordpress")))
    lab.push(HOST, rules.old)
    assert lab.firewall_state(HOST) == rules.old_state


def push(lab: Lab, files: RuleFiles, kill_at: str | None = None, window_s: int = WINDOW_S) -> tuple[int, str]:
    env = f"ENCLAVE_ROLLBACK_SECONDS={window_s} " + (f"ENCLAVE_TEST_KILL_AT={kill_at} " if kill_at else "")
    result = lab.ssh(HOST, f"{env}sh -s", input=push_script(files, lab.stack.name))
    return result.returncode, result.stdout + result.stderr


def confirm(lab: Lab, files: RuleFiles, kill_at: str | None = None) -> tuple[int, str]:
    env = f"ENCLAVE_TEST_KILL_AT={kill_at} " if kill_at else ""
    result = lab.ssh(HOST, f"{env}sh -s", input=confirm_script(files, lab.stack.name))
    return result.returncode, result.stdout + result.stderr


# ------------------------------------------------------------------------------------ kill -9 in a push


@pytest.mark.parametrize("step", steps(PUSH_STEPS))
def test_a_push_killed_at_any_step_never_opens_and_rolls_back(lab: Lab, rules: Rules, step: str) -> None:
    code, output = push(lab, rules.new, kill_at=step)
    assert code != 0, output  # killed: pulumi up would report the push failed and never confirm it
    assert_nothing_else_admitted(lab)
    assert_proven(lab, rules, rules.old)
    # and a retry converges
    lab.push(HOST, rules.new)
    assert lab.firewall_state(HOST) == rules.new_state and state(lab, "confirmed") == digest(rules.new)


@pytest.mark.parametrize("step", steps(PUSH_STEPS))
def test_a_reboot_at_any_step_of_a_push_comes_back_on_the_confirmed_rules(lab: Lab, rules: Rules, step: str) -> None:
    push(lab, rules.new, kill_at=step)
    lab.reboot(HOST)
    assert_nothing_else_admitted(lab)
    assert_proven(lab, rules, rules.old)
    code, output = confirm(lab, rules.new)  # a confirm still dialing must not promote anything now
    assert code == 1 and f"rules {digest(rules.new)} are not in force" in output, output
    assert state(lab, "confirmed") == digest(rules.old)


# ------------------------------------------------------------------------------- kill -9 in a confirm


@pytest.mark.parametrize("step", steps(["confirm:locked", "confirm:promoted"]))
def test_a_confirm_killed_at_any_step_ends_on_proven_rules(lab: Lab, rules: Rules, step: str) -> None:
    code, output = push(lab, rules.new)
    assert code == 0, output
    code, output = confirm(lab, rules.new, kill_at=step)
    assert code != 0
    assert_nothing_else_admitted(lab)
    # killed before it promoted: the timer rolls back; after it promoted: the new rules were proven, they stay
    assert_proven(lab, rules, rules.new if step == "confirm:promoted" else rules.old)
    code, output = confirm(lab, rules.new)  # the retry says what is true
    assert (code == 0) == (step == "confirm:promoted"), output


# ------------------------------------------------------------------------------- kill -9 in a restore


@pytest.mark.parametrize("step", steps(["restore:closed", "apply:sets", "apply:v4", "apply:v6"]))
def test_a_restore_killed_at_any_step_leaves_the_host_closed(lab: Lab, rules: Rules, step: str) -> None:
    """A pending push, then a reboot whose boot restore (the systemd unit) is killed at `step`: the host stays
    closed; cloud-init's bootcmd, which runs the restore again, brings the confirmed rules back."""
    code, output = push(lab, rules.new, window_s=60)
    assert code == 0, output
    lab.reboot(HOST, boot_env={"ENCLAVE_TEST_KILL_AT": step})
    assert_nothing_else_admitted(lab, baseline=True)  # the restore starts from the closed rules
    assert not (lab.state_dir(HOST) / "pending").exists()  # void from the moment the host restarted
    lab.console(HOST, baseline_script(baseline_files(lab.stack.config, "wordpress")))  # bootcmd
    assert_nothing_else_admitted(lab)
    assert_proven(lab, rules, rules.old)


def test_a_killed_rollback_timer_leaves_nothing_open_and_a_retry_converges(lab: Lab, rules: Rules) -> None:
    """The timer itself killed after it took the lock: the one fault no host-side process can cover (nothing is
    left to roll back). Nothing outside the old or new rules is admitted, and the next push (or boot) converges."""
    code, output = push(lab, rules.new, kill_at="rollback:locked")  # only the timer passes that step
    assert code == 0, output
    end = time.monotonic() + WINDOW_S + 30
    while not list(lab.state_dir(HOST).glob("test-killed-at-*")):
        assert time.monotonic() < end
        time.sleep(0.2)
    assert_nothing_else_admitted(lab)
    assert lab.ssh(HOST, "true", timeout=30).returncode == 0
    lab.push(HOST, rules.old)
    assert_proven(lab, rules, rules.old)


# ----------------------------------------------------------------------------------- damaged files


def damage(lab: Lab, slot: str, how: str) -> None:
    d = (lab.state_dir(HOST) / slot).resolve()
    if how == "rules.v4 empty":
        (d / "rules.v4").write_text("")
    elif how == "rules.v4 truncated":
        text = (d / "rules.v4").read_text()
        (d / "rules.v4").write_text(text[: len(text) // 2])
    elif how == "ipsets empty":
        (d / "ipsets").write_text("")
    elif how == "sets missing":
        (d / "sets").unlink()
    elif how == "SHA256SUMS missing":
        (d / "SHA256SUMS").unlink()
    elif how == "rules.v6 bad target, sums rewritten":  # only the kernel can tell
        (d / "rules.v6").write_text((d / "rules.v6").read_text().replace('"default drop" -j DROP', '"default drop" -j NOSUCHTARGET'))
        sums = "".join(f"{hashlib.sha256((d / n).read_bytes()).hexdigest()}  {n}\n"
                       for n in ("digest", "host", "ipsets", "rules.v4", "rules.v6", "sets"))
        (d / "SHA256SUMS").write_text(sums)
    elif how == "dangling":
        shutil.rmtree(d)
    else:
        raise AssertionError(how)


DAMAGE = ["rules.v4 empty", "rules.v4 truncated", "ipsets empty", "sets missing", "SHA256SUMS missing",
          "rules.v6 bad target, sums rewritten", "dangling"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_confirmed_rules_boot_on_the_baseline(lab: Lab, rules: Rules, how: str) -> None:
    damage(lab, "confirmed", how)
    lab.reboot(HOST)
    assert state(lab, "in-force") == rules.baseline_digest
    assert "baseline: ssh from the VPC" in lab.console(HOST, "iptables -S ENCLAVE-INPUT").stdout
    assert "-P INPUT DROP" in lab.console(HOST, "iptables -S INPUT; ip6tables -S INPUT").stdout
    assert_nothing_else_admitted(lab, baseline=True)
    assert lab.ssh(HOST, "true", timeout=30).returncode == 0


def test_damaged_confirmed_and_baseline_rules_boot_closed_with_the_baselines_ssh(lab: Lab, rules: Rules) -> None:
    """The systemd unit's restore (before cloud-init, which would reinstall the baseline from user data) with
    both the confirmed rules and the baseline damaged: the built-in closed rules, SSH only as the baseline says."""
    damage(lab, "confirmed", "rules.v4 empty")
    damage(lab, "baseline", "SHA256SUMS missing")  # untrusted as a whole; its SSH accept lines are still read
    lab.console(HOST, WIPE_KERNEL_STATE)  # a reboot's kernel state, then what the unit runs
    restored = lab.console(HOST, f"sh {lab.state_dir(HOST)}/apply.sh restore", check=False)
    assert restored.returncode == 2 and "built-in closed rules" in restored.stderr, restored.stderr
    assert state(lab, "in-force") == "closed"
    tables = lab.console(HOST, "iptables -S; ip6tables -S").stdout
    assert tables.count("-P INPUT DROP") == 2 and tables.count("-P FORWARD DROP") == 2
    assert "enclave closed" in tables and "baseline: ssh from the VPC" in tables
    assert_nothing_else_admitted(lab, baseline=True)
    assert lab.ssh(HOST, "true", timeout=30).returncode == 0


# ------------------------------------------------------------------------------------- interleavings


def test_a_rejected_push_then_its_confirm_promotes_nothing(lab: Lab, rules: Rules) -> None:
    bad = dataclasses.replace(rules.new, ipv4=rules.new.ipv4.replace("--dport 22 ", "--dport 99999 "))
    code, output = push(lab, bad)
    assert code == 1 and f"enclave push {HOST}: rules {digest(bad)} rejected; nothing was changed" in output, output
    code, output = confirm(lab, bad)
    assert code == 1 and "are not in force" in output
    lab.reboot(HOST)
    assert_proven(lab, rules, rules.old)


def test_a_rejected_push_keeps_a_pending_push_and_its_sets_untouched(lab: Lab, rules: Rules) -> None:
    code, output = push(lab, rules.new)
    assert code == 0, output
    sets_before = lab.console(HOST, "ipset save").stdout  # initval included: nothing destroyed and recreated
    bad = dataclasses.replace(rules.old, ipv6=rules.old.ipv6.replace('"default drop" -j DROP', '"default drop" -j NOSUCHTARGET'))
    code, output = push(lab, bad)
    assert code == 1 and "rejected; nothing was changed" in output and "IPv6 rules rejected" in output, output
    assert lab.console(HOST, "ipset save").stdout == sets_before
    assert lab.firewall_state(HOST) == rules.new_state
    code, output = confirm(lab, rules.new)
    assert code == 0, output
    assert_proven(lab, rules, rules.new)


def test_two_interleaved_pushes_neither_confirmed_roll_back_to_the_confirmed_rules(lab: Lab, rules: Rules) -> None:
    other = without_rule(rules.old, "roles.wordpress.ingress[0]")
    assert push(lab, rules.new)[0] == 0
    time.sleep(WINDOW_S / 2)
    assert push(lab, other)[0] == 0
    code, output = confirm(lab, rules.new)
    assert code == 1 and f"a later push replaced them with rules {digest(other)}" in output, output
    assert_nothing_else_admitted(lab)
    assert_proven(lab, rules, rules.old)  # both windows over: back on the confirmed rules, nothing pending


def test_concurrent_pushes_serialise_and_only_the_last_can_be_confirmed(lab: Lab, rules: Rules) -> None:
    other = without_rule(rules.old, "roles.wordpress.ingress[0]")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda f: push(lab, f, window_s=20), [rules.new, other]))
    assert [code for code, _ in results] == [0, 0], results
    last = digest(rules.new) if state(lab, "in-force") == digest(rules.new) else digest(other)
    winner, loser = (rules.new, other) if last == digest(rules.new) else (other, rules.new)
    assert confirm(lab, loser)[0] == 1
    assert confirm(lab, winner)[0] == 0
    assert state(lab, "confirmed") == digest(winner) == state(lab, "in-force")
    assert lab.ssh(HOST, "true", timeout=30).returncode == 0


# ------------------------------------------------------------------------- jumps and other tools' chains


BAN = """for t in iptables ip6tables; do $t -w -N f2b-web; $t -w -A f2b-web -s "$( [ $t = iptables ] && echo {v4} || echo {v6} )" -j REJECT; $t -w -A f2b-web -j RETURN; done
"""
FAIL2BAN_STARTS = "for t in iptables ip6tables; do $t -w -I INPUT -p tcp -m multiport --dports 80 -j f2b-web; done\n"


def web(lab: Lab, source: str, kind: str) -> bool:
    (probe,) = [p for p in plan_probes(lab.policy, lab.addresses, lab.others).probes
                if (p.source.name, p.target.host, p.target.kind, str(p.port)) == (source, "haproxy-www-1", kind, "tcp/80")]
    (outcome,) = send_probes({source: str(lab.agent_socket(source))}, [probe])
    return outcome.passed


@pytest.mark.parametrize("how", ["boot order", "enclave's jump deleted by hand", "INPUT flushed by hand"])
def test_a_ban_chain_stays_consulted_before_enclaves_accepts(lab: Lab, how: str) -> None:
    host = "haproxy-www-1"
    ban = BAN.format(v4=lab.others.internet.address, v6=lab.others.internet.address6)
    try:
        if how == "boot order":
            lab.reboot(host)  # enclave's unit first, then fail2ban starts and inserts its jump
            lab.console(host, ban + FAIL2BAN_STARTS)
        else:
            lab.console(host, ban + FAIL2BAN_STARTS)
            if how == "enclave's jump deleted by hand":
                lab.console(host, "iptables -w -D INPUT -j ENCLAVE-INPUT; ip6tables -w -D INPUT -j ENCLAVE-INPUT")
            else:  # everything flushed, then fail2ban puts its own jump back (as its actioncheck does)
                lab.console(host, "iptables -w -F INPUT; ip6tables -w -F INPUT\n" + FAIL2BAN_STARTS)
            # no jump and INPUT's policy DROP: SSH is cut too, so the operator pushes from the console
            console_push(lab, host)
        inputs = lab.console(host, "iptables -S INPUT; ip6tables -S INPUT").stdout.splitlines()
        jumps = [line.split("-j ")[-1] for line in inputs if "-j " in line]
        assert jumps == ["f2b-web", "ENCLAVE-INPUT", "f2b-web", "ENCLAVE-INPUT"], inputs
        assert not web(lab, "internet", "public") and not web(lab, "internet", "public6")  # banned, both families
        assert web(lab, "operator", "public")  # everyone else still gets in
    finally:
        lab.console(host, "for t in iptables ip6tables; do $t -w -D INPUT -p tcp -m multiport --dports 80 -j f2b-web;"
                          " $t -w -F f2b-web; $t -w -X f2b-web; done", check=False)
        console_push(lab, host)
        assert lab.ssh(host, "true", timeout=30).returncode == 0


def console_push(lab: Lab, host: str) -> None:
    """The push and its confirmation run on the host's console (the same scripts, no SSH)."""
    for script in (push_script(lab.files[host], lab.stack.name), confirm_script(lab.files[host], lab.stack.name)):
        lab.console(host, script)
