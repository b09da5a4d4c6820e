"""`python -m enclave.pushrun` as `pulumi up` runs it, against the lab's real sshd (droplet defaults) and OpenSSH.

The lab's push_all is an engine-like driver: every host's push is its own process, started first in, first out
at the engine's parallelism, bastions first; without --continue-on-error the first failure starts nothing more.
What an operator must be able to count on (issue 10): a fleet pushed at P = 16 with no rollback over one
connection to the bastion; a host that is down fails alone and the next run pushes it; a run killed halfway
converges on the next one; a replaced bastion and a rotated key lock nobody out; a rebuilt droplet is named;
`enclave audit` finds drift and the next push repairs it. The 100-host run is benchmarks/push_cost.py.
"""

from __future__ import annotations

import dataclasses
import functools
import fcntl
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.push_cost import scaled_stack
from config.stackfile import load_stack_file
from enclave.lab.lab import PROJECT_ROOT, Lab, PushFailed
from enclave.plan import build_plan
from enclave.push import digest, push_script
from enclave.pushrun import COMMAND, ENV_PRIVATE_KEY, EXIT_BAD_REQUEST, PushRequest, push_request
from enclave.render import RuleFiles

from ..conftest import stack_document
from .test_lab import _unavailable, without_rule

pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=f"lab unavailable: {_unavailable()}")

PARALLEL = 16  # pushes at once, as the engine runs them on a machine of 4 cores


@functools.cache
def window_s() -> int:
    """The hosts' rollback window in these tests (the program's is 90 s): short, so a test that waits for a
    rollback is quick, and long enough that a confirm racing PARALLEL other runs makes it on THIS machine now.
    A confirm is a new process's SSH login and a short script, so its delay grows with how long the machine takes
    to start PARALLEL processes at once: measured (the slowest of three bursts; ~0.2 s on 2 idle cores, about
    twice that beside two CPU hogs) and scaled, never below 4 s. Measured once, before the first lab is built."""
    bursts = []
    for _ in range(3):
        started = time.monotonic()
        for proc in [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(PARALLEL)]:
            proc.wait()
        bursts.append(time.monotonic() - started)
    window = min(60, max(4, math.ceil(20 * max(bursts))))
    print(f"rollback window {window} s (bursts of {PARALLEL} process starts: {', '.join(f'{b:.2f}' for b in bursts)} s)")
    return window
FLEET = 18  # hosts in the suite's fleet (the 100-host run is the benchmark's, under the heavy lock)


def confirmed(lab: Lab, host: str) -> str | None:
    path = lab.state_dir(host) / "confirmed" / "digest"
    return path.read_text().strip() if path.exists() else None


def rolled_back(lab: Lab) -> list[str]:
    return [h.name for h in lab.hosts if (lab.state_dir(h.name) / "rolled-back").exists()]


def pending(lab: Lab) -> list[str]:
    return [h.name for h in lab.hosts if (lab.state_dir(h.name) / "pending").exists()]


def marked(files: RuleFiles, note: str) -> RuleFiles:
    """The same rules with a comment line: a new digest (the push re-runs), the same live rules."""
    return dataclasses.replace(files, ipv4=files.ipv4.replace("COMMIT\n", f"# {note}\nCOMMIT\n", 1))


def bastion_logins(lab: Lab) -> int:
    bastion = lab.policy.bastion_hosts()[0].name
    return (lab.host_dir(bastion) / "sshd.log").read_text(errors="replace").count("Accepted publickey")


def kill_sshd(lab: Lab, host: str) -> None:
    lab.console(host, f'kill "$(cat {lab.host_dir(host)}/sshd.pid)"; rm -f {lab.host_dir(host)}/sshd.pid')


def start_sshd(lab: Lab, host: str) -> None:
    lab._start_sshd(host)
    while not (lab.host_dir(host) / "sshd.pid").exists():
        time.sleep(0.05)


def wait_until(condition: Callable[[], object], describe: Callable[[], str], deadline_s: float) -> None:
    """Until condition() holds; fails with describe() (what was seen) after a generous deadline. No fixed sleep."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"not within {deadline_s} s: {describe()}"
        time.sleep(0.05)


def run_dirs(lab: Lab) -> list[Path]:
    return sorted((lab.dir / "s").glob("run-*"))


@pytest.fixture(scope="module")
def fleet(run_ids: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    stack = scaled_stack(FLEET, tmp_path_factory.mktemp("stacks"))
    with Lab(stack, host_env={"ENCLAVE_ROLLBACK_SECONDS": str(window_s())}) as lab:
        run_ids.append(lab.run_id)
        yield lab


# ------------------------------------------------------------------------------------ the engine's way


def test_a_fleet_at_the_engines_parallelism_is_confirmed_without_rollback_over_one_bastion_connection(fleet: Lab) -> None:
    failures = fleet.push_all(PARALLEL, continue_on_error=False)
    assert not failures, {h: str(f) for h, f in failures.items()}
    assert {h.name: confirmed(fleet, h.name) for h in fleet.hosts} == {h: digest(f) for h, f in fleet.files.items()}
    assert rolled_back(fleet) == [] and pending(fleet) == []
    # The bastion's sshd saw its own push, its own confirm and the one shared master: not two logins per host.
    assert bastion_logins(fleet) <= 3, bastion_logins(fleet)
    bastion = fleet.addresses[fleet.policy.bastion_hosts()[0].name].public
    outputs = {h: json.loads(out) for h, out in fleet.push_stdout.items()}
    assert all(o["digest"] == digest(fleet.files[h]) for h, o in outputs.items())
    assert {o["via"] for h, o in outputs.items() if h != "tunnel-1"} == {bastion}
    assert outputs["tunnel-1"]["via"] is None
    assert run_dirs(fleet) == []  # every run removed its key files


def test_the_first_failure_starts_no_more_pushes_leaves_no_host_half_pushed_and_the_next_run_converges(fleet: Lab) -> None:
    down = "mysql-3"
    for host, files in list(fleet.files.items()):
        fleet.files[host] = marked(files, "second run")
    kill_sshd(fleet, down)
    try:
        failures = fleet.push_all(PARALLEL, continue_on_error=False)
    finally:
        start_sshd(fleet, down)
    assert failures[down].step == "push" and failures[down].result.returncode == 255
    assert f"SSH could not reach {down}" in str(failures[down])
    others = {h: f.step for h, f in failures.items() if h != down}
    assert set(others.values()) <= {"not started"}, others  # nothing was cancelled half-way through a push
    # every run has ended: one that started either confirmed or never applied, so nothing is left to roll back
    assert rolled_back(fleet) == [] and pending(fleet) == []
    for host in fleet.files:  # each host: the new rules confirmed, or the old ones untouched
        assert confirmed(fleet, host) in (digest(fleet.files[host]), digest(fleet.plan.files[host])), host
    assert not fleet.push_all(PARALLEL, continue_on_error=False)
    assert {h: confirmed(fleet, h) for h in fleet.files} == {h: digest(f) for h, f in fleet.files.items()}


def test_a_host_that_is_down_fails_alone_and_the_next_run_pushes_it(fleet: Lab) -> None:
    down = "wordpress-2"
    for host, files in list(fleet.files.items()):
        fleet.files[host] = marked(files, "third run")
    kill_sshd(fleet, down)
    try:
        failures = fleet.push_all(PARALLEL, continue_on_error=True)  # `pulumi up --continue-on-error`
    finally:
        start_sshd(fleet, down)
    assert list(failures) == [down] and failures[down].step == "push"
    assert {h: confirmed(fleet, h) for h in fleet.files if h != down} == {
        h: digest(f) for h, f in fleet.files.items() if h != down}
    assert confirmed(fleet, down) != digest(fleet.files[down])
    output = fleet.push(down)  # the next run
    assert confirmed(fleet, down) == digest(fleet.files[down]) and "confirmed over a new connection" in output


def test_a_run_killed_halfway_leaves_hosts_rolling_back_by_themselves_and_the_next_run_converges(fleet: Lab) -> None:
    before = {h: confirmed(fleet, h) for h in fleet.files}
    for host, files in list(fleet.files.items()):
        fleet.files[host] = marked(files, "killed run")
    failures = fleet.push_all(PARALLEL, continue_on_error=False, kill_after=4)  # SIGKILL every push still running
    killed = [h for h, f in failures.items() if f.step == "killed"]
    assert killed, {h: f.step for h, f in failures.items()}
    # the killed runs' guards removed their key files, and no host waits for a confirmation that will never come
    wait_until(lambda: run_dirs(fleet) == [], lambda: f"run directories left: {run_dirs(fleet)}", 60)
    wait_until(lambda: pending(fleet) == [], lambda: f"still pending: {pending(fleet)}", window_s() + 120)
    for host in fleet.files:
        assert confirmed(fleet, host) in (before[host], digest(fleet.files[host])), host
    assert not fleet.push_all(PARALLEL, continue_on_error=False)
    assert {h: confirmed(fleet, h) for h in fleet.files} == {h: digest(f) for h, f in fleet.files.items()}
    assert run_dirs(fleet) == []


def run_ssh(run_dir: Path) -> dict[int, str]:
    """The run's own ssh processes (pid: command line): those given its generated config, except the bastion's
    shared ControlMaster, which serves every run and exits by itself CONTROL_PERSIST_S after its last session."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if argv and Path(argv[0]).name == "ssh" and any(str(run_dir) in a for a in argv) \
                and "ControlMaster=yes" not in argv:
            found[int(entry.name)] = " ".join(argv)
    return found


def lock_users(path: Path) -> list[int]:
    """Processes other than this one with `path` open (the host's lock: a push waiting for it, or holding it)."""
    users = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in (entry / "fd").iterdir()):
                users.append(int(entry.name))
        except OSError:
            continue
    return users


def test_a_push_sigkilled_as_the_engine_cancels_it_leaves_no_key_no_ssh_and_the_host_unchanged(fleet: Lab) -> None:
    """Ctrl-C on `pulumi up`: pulumi-command SIGKILLs the command's process alone, no grace, so the run's own
    cleanup never runs. Killed mid-push (its ssh session open, the host's push waiting for the host lock this
    test holds, so that ssh would wait forever), the run leaves no key on disk and no ssh of its own, and the
    host ends with its confirmed rules, whatever its half of the push did once the lock was free."""
    host = next(h.name for h in fleet.hosts if not fleet.policy.stack.roles[h.role].bastion)
    before = confirmed(fleet, host)
    lock = fleet.state_dir(host) / "lock"
    held = os.open(lock, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc, stdin = fleet._start_push(host, marked(fleet.files[host], "killed mid-push"), window_s() + 300, None)
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()

        def runs() -> list[Path]:
            return sorted((fleet.dir / "s").glob(f"run-{proc.pid}-*"))

        wait_until(lambda: lock_users(lock) and runs() and run_ssh(runs()[0]),
                   lambda: f"the push waiting for {host}'s lock (lock users: {lock_users(lock)}, runs: {runs()})", 120)
        run_dir = runs()[0]
        assert (run_dir / "key").exists()
        ssh = run_ssh(run_dir)
        proc.kill()  # SIGKILL to the run alone, as exec.CommandContext does
        proc.wait(30)
        wait_until(lambda: not run_dir.exists(), lambda: f"the key is still on disk: {sorted(run_dir.iterdir())}", 30)
        wait_until(lambda: not run_ssh(run_dir), lambda: f"the run's ssh outlived it: {run_ssh(run_dir)} (was {ssh})", 30)
    finally:
        os.close(held)
    # the host's half ends by itself: it stops at its input's end, or applies and rolls back unconfirmed
    wait_until(lambda: not lock_users(lock) and host not in pending(fleet),
               lambda: f"{host}: lock users {lock_users(lock)}, pending {pending(fleet)}", window_s() + 120)
    assert confirmed(fleet, host) == before
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


# --------------------------------------------------------------------------- bastions, keys, rebuilds


@pytest.fixture(scope="module")
def two_bastions(run_ids: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """dev with two tunnel hosts, first pushed with the rules of a one-tunnel dev: every host admits SSH from
    tunnel-1 only, as after years with one bastion. tunnel-2 is then "the replacement"."""
    directory = tmp_path_factory.mktemp("stacks")
    doc = stack_document("dev")
    doc["config"]["enclave:roles"]["tunnel"]["count"] = 2
    path = directory / "Pulumi.dev2.yaml"
    path.write_text(yaml.safe_dump(doc))
    stack = load_stack_file(path)
    one = dict(doc, config=dict(doc["config"], **{"enclave:roles": {
        **doc["config"]["enclave:roles"], "tunnel": {**doc["config"]["enclave:roles"]["tunnel"], "count": 1}}}))
    (directory / "Pulumi.dev1.yaml").write_text(yaml.safe_dump(one))
    old = build_plan(load_stack_file(directory / "Pulumi.dev1.yaml")).files
    override = {h: f for h, f in old.items() if not h.startswith("tunnel")}
    with Lab(stack, files_override=override, host_env={"ENCLAVE_ROLLBACK_SECONDS": str(window_s())}) as lab:
        run_ids.append(lab.run_id)
        assert not lab.push_all()
        yield lab


def test_a_replaced_bastion_pushes_through_the_previous_one_and_confirms_through_the_new_one(two_bastions: Lab) -> None:
    lab = two_bastions
    old, new = (lab.addresses[name].require_public(name) for name in ("tunnel-1", "tunnel-2"))
    host = "mysql-1"
    assert json.loads(lab.push_stdout[host])["via"] == old
    current = lab.plan.files[host]  # the rules of the stack with the new bastion: they admit tunnel-2
    # The request names the new bastion only; the previous run's stdout (PULUMI_COMMAND_STDOUT) names the old.
    output = json.loads(lab.push(host, current, bastions=[new]).splitlines()[-1])
    assert (output["pushedVia"], output["via"]) == (old, new)
    assert confirmed(lab, host) == digest(current)
    again = json.loads(lab.push(host, current, bastions=[new]).splitlines()[-1])
    assert again["pushedVia"] == new  # from now on the new bastion reaches it directly


def test_without_the_previous_bastion_a_host_that_admits_only_it_is_named_unreachable(two_bastions: Lab) -> None:
    lab = two_bastions
    new = lab.addresses["tunnel-2"].require_public("tunnel-2")
    host = "wordpress-1"
    del lab.push_stdout[host]  # as on a first run: no previous "via" to fall back on
    with pytest.raises(PushFailed) as failed:
        lab.push(host, lab.plan.files[host], bastions=[new])
    assert failed.value.step == "push" and failed.value.result.returncode == 255
    assert f"SSH could not reach {host}" in str(failed.value) and f"through {new}" in str(failed.value)
    assert confirmed(lab, host) == digest(lab.files[host])  # untouched


def _new_key(lab: Lab, name: str) -> tuple[str, str]:
    path = lab.dir / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path.read_text(), (lab.dir / f"{name}.pub").read_text().strip()


def test_a_rotated_key_logs_in_with_the_previous_one_and_never_locks_out(two_bastions: Lab) -> None:
    lab, host = two_bastions, "haproxy-www-1"
    old_private, old_public = lab.private_key, lab.public_key
    new_private, new_public = _new_key(lab, "rotated")
    authorized = lab.host_dir(host) / "home" / ".ssh" / "authorized_keys"
    try:
        # Without the previous key, the new one alone cannot get in: the push fails and changes nothing.
        lab.private_key, lab.public_key = new_private, new_public
        with pytest.raises(PushFailed) as failed:
            lab.push(host, marked(lab.files[host], "new key alone"))
        assert failed.value.step == "push" and failed.value.result.returncode == 255
        assert confirmed(lab, host) == digest(lab.files[host])
        # With the previous key in ENCLAVE_SSH_PREVIOUS_PRIVATE_KEY, the push logs in with it.
        lab.previous_private_key = old_private
        rotated = marked(lab.files[host], "rotation")
        host_side = "ssh_public_key" in inspect.signature(push_script).parameters
        if host_side:  # the host script authorizes the new key: the confirm logs in with it
            lab.push(host, rotated)
            assert confirmed(lab, host) == digest(rotated) and new_public in authorized.read_text()
        else:  # until it does, the push applied and the confirm (new key only) cannot get in: no lock-in either
            with pytest.raises(PushFailed) as failed:
                lab.push(host, rotated)
            assert failed.value.step == "confirm" and "applied rules" in failed.value.result.stderr
            assert "does the host know the new key" in str(failed.value)
            authorized.write_text(authorized.read_text() + new_public + "\n")  # what the host script will do
            lab.push(host, rotated)
            assert confirmed(lab, host) == digest(rotated)
        # the rotation is over: the previous key leaves the config, the new one alone gets in
        lab.previous_private_key = None
        lab.push(host)
        assert confirmed(lab, host) == digest(lab.files[host])
    finally:
        lab.private_key, lab.public_key, lab.previous_private_key = old_private, old_public, None
        authorized.write_text(old_public + "\n")


def audit(lab: Lab, *extra: str) -> subprocess.CompletedProcess[str]:
    """`enclave audit` from the operator namespace, with the lab's key, runtime directory and known_hosts."""
    assert lab.stack.path is not None
    argv = lab.in_ns("operator", [sys.executable, "-m", "enclave.cli", "audit", "--stack-file", str(lab.stack.path),
                                  "--identity-file", str(lab.dir / "id_ed25519"), "--format", "json", *extra])
    return subprocess.run(argv, capture_output=True, text=True, cwd=PROJECT_ROOT, env=lab.operator_env(), timeout=120)


def audited(lab: Lab) -> tuple[int, dict[str, Any]]:
    result = audit(lab)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, {h["host"]: h for h in json.loads(result.stdout)["hosts"]}


def test_audit_finds_drift_names_the_fix_and_the_next_push_repairs_it(two_bastions: Lab) -> None:
    lab = two_bastions
    for host in lab.files:  # the stack as it is now: both bastions admitted everywhere
        lab.files[host] = lab.plan.files[host]
        lab.push(host)
    code, hosts = audited(lab)
    assert code == 0 and all(h["inSync"] for h in hosts.values()), hosts
    wordpress = lab.addresses["wordpress-1"].private
    # the live set of role wordpress: its name carries a hash of its members (enclave.push.host_files)
    (wordpress_set,) = [n for n in lab.console("mysql-1", "ipset list -n").stdout.split()
                        if n.startswith("enclave-wordpress.")]
    lab.console("mysql-1", "iptables -w -I ENCLAVE-INPUT 1 -s 203.0.113.9 -j ACCEPT\n"
                           f"ipset add {wordpress_set} 10.120.0.99\n")
    lab.console("wordpress-1", "ip6tables -w -F ENCLAVE-INPUT")
    lab.push("haproxy-www-1", marked(lab.files["haproxy-www-1"], "an older push"))  # confirmed, not the stack's
    cut = without_rule(lab.files["haproxy-www-1"], "ssh through bastion tunnel")
    with pytest.raises(PushFailed):  # the stack's next push cut SSH: rolled back, the confirm said so
        lab.push("haproxy-www-1", cut, redial_s=window_s() + 15)
    code, hosts = audited(lab)
    assert code == 1
    assert hosts["tunnel-1"]["inSync"] and hosts["tunnel-2"]["inSync"]
    assert "foreign rule (IPv4): -A ENCLAVE-INPUT -s 203.0.113.9/32 -j ACCEPT" in hosts["mysql-1"]["drift"]
    assert f"set members: {wordpress_set} has 10.120.0.99 too" in hosts["mysql-1"]["drift"]
    assert wordpress not in " ".join(hosts["mysql-1"]["drift"])
    assert any(d.startswith("flushed: IPv6") for d in hosts["wordpress-1"]["drift"]), hosts["wordpress-1"]
    assert any(d.startswith("rolled back:") for d in hosts["haproxy-www-1"]["drift"]), hosts["haproxy-www-1"]
    assert hosts["mysql-1"]["fix"] == [
        f"pulumi config set --stack {lab.stack.name} --path 'repush[\"mysql-1\"]' 1 && pulumi up --stack {lab.stack.name} "
        f"--target 'urn:pulumi:{lab.stack.name}::enclave::enclave:index:EnclaveNetwork$command:local:Command::{lab.stack.name}-mysql-1-push'"]
    for host in ("mysql-1", "wordpress-1", "haproxy-www-1"):
        lab.push(host)  # what the printed re-push runs: the host's push
    code, hosts = audited(lab)
    assert code == 0, {h: v["drift"] for h, v in hosts.items() if v["drift"]}


def test_a_droplet_rebuilt_with_a_new_host_key_is_refused_named_and_pushed_once_accepted(two_bastions: Lab) -> None:
    lab, host = two_bastions, "wordpress-1"
    key = lab.host_dir(host) / "ssh_host_ed25519_key"
    kill_sshd(lab, host)
    key.unlink()
    Path(f"{key}.pub").unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    start_sshd(lab, host)
    with pytest.raises(PushFailed) as failed:
        lab.push(host)
    assert failed.value.result.returncode == 255
    assert f"the host key of {host} ({lab.addresses[host].private}) changed" in str(failed.value)
    assert f"ssh-keygen -R {lab.addresses[host].private} -f {lab.dir / 'known_hosts'}" in str(failed.value)
    code, hosts = audited(lab)
    assert code == 1 and hosts[host]["drift"][0].startswith("host key changed")
    (remove,) = [line for line in hosts[host]["fix"] if line.startswith("ssh-keygen -R")]
    subprocess.run(remove.split(), check=True, capture_output=True)  # the operator checked the new key
    lab.push(host, lab.plan.files[host])  # the stack's rules (what audit compares with)
    code, hosts = audited(lab)
    assert hosts[host]["inSync"], hosts[host]


# ------------------------------------------------------------------------------------- the run itself


def pushrun(stdin: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The program's command line, as the local.Command runs it from the project directory."""
    return subprocess.run([sys.executable, *COMMAND.split()[1:]], input=stdin, capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env=env, timeout=60)


def test_a_bad_request_or_a_missing_key_exits_2_before_any_connection(tmp_path: Path) -> None:
    env = {**os.environ, "ENCLAVE_SSH_RUNTIME_DIR": str(tmp_path / "ssh"), ENV_PRIVATE_KEY: ""}
    garbage = pushrun("not json\n", env)
    assert garbage.returncode == EXIT_BAD_REQUEST and "stdin is not a push request" in garbage.stderr
    assert json.loads(garbage.stdout)["failed"] == "request"
    plan = build_plan(load_stack_file(PROJECT_ROOT / "stacks" / "Pulumi.dev.yaml"))
    host = plan.policy.host_by_name["mysql-1"]
    request = push_request("dev", plan.policy, plan.addresses, host, plan.files["mysql-1"], user="root",
                           public_key="ssh-ed25519 AAAA", deadline_s=5)
    assert PushRequest.from_stdin(request.to_stdin()) == request
    no_key = pushrun(request.to_stdin(), env)
    assert no_key.returncode == EXIT_BAD_REQUEST and "ENCLAVE_SSH_PRIVATE_KEY does not hold a private key" in no_key.stderr
    assert "enclave push mysql-1" in no_key.stderr and digest(plan.files["mysql-1"]) in no_key.stderr
    assert not (tmp_path / "ssh").exists() or not list((tmp_path / "ssh").glob("run-*"))


def test_a_run_stopped_by_sigterm_removes_its_key_and_exits_with_the_signal(fleet: Lab) -> None:
    host = "mysql-2"
    kill_sshd(fleet, host)  # the run keeps retrying (a droplet still booting)
    try:
        proc, stdin = fleet._start_push(host, None, 120, None)
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        proc.stdin = None  # communicate() must not flush it again
        wait_until(lambda: run_dirs(fleet), lambda: "the run should hold its key file while it retries", 60)
        os.kill(proc.pid, signal.SIGTERM)  # what Pulumi sends a command it cancels
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM, stderr
    finally:
        start_sshd(fleet, host)
    assert run_dirs(fleet) == []


def test_a_host_still_booting_is_retried_until_its_sshd_answers(fleet: Lab) -> None:
    host = "mysql-4"
    kill_sshd(fleet, host)  # a droplet whose sshd does not answer yet
    try:
        proc, stdin = fleet._start_push(host, marked(fleet.files[host], "booting"), 120, None)
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        proc.stdin = None
        time.sleep(3)  # how long this droplet takes to boot: the run keeps retrying meanwhile
        (run,) = run_dirs(fleet)  # while it retries it holds the key, private to this user
        assert run.stat().st_mode & 0o777 == 0o700 and (run / "key").stat().st_mode & 0o777 == 0o600
    finally:
        start_sshd(fleet, host)  # the droplet finished booting
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    output = json.loads(stdout)
    assert output["attempts"] >= 3 and "Connection refused" not in stdout  # retried; stdout is the JSON alone
    assert confirmed(fleet, host) == output["digest"] == digest(marked(fleet.files[host], "booting"))
    fleet.push(host)  # back to the fleet's rules


def test_audit_refuses_a_key_file_it_cannot_read_naming_the_flag(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "enclave.cli", "audit", "--stack", "dev", "--identity-file", str(tmp_path / "nope")]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert result.returncode == 2
    assert "--identity-file" in result.stderr and str(tmp_path / "nope") in result.stderr
