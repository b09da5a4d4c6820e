"""A push run SIGKILLed as the Pulumi engine cancels it leaves no key and no ssh behind (enclave/runguard.py).

No root, no SSH: a stand-in run opens the real Transport (key files, the guard), starts a `sleep` where the
run would have its `ssh` clients, and is SIGKILLed alone, as pulumi-command's exec.CommandContext does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from enclave.transport import ENV_KNOWN_HOSTS, ENV_RUNTIME_DIR, Transport

ROOT = Path(__file__).resolve().parent.parent.parent
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-key\n-----END OPENSSH PRIVATE KEY-----\n"

STAND_IN = textwrap.dedent(f"""
    import os, subprocess, sys, time
    from enclave.transport import Transport
    os.setpgid(0, 0)  # as enclave.pushrun does
    with Transport(stack="t", user="root", private_key={KEY!r}, previous_private_key=None, address="192.0.2.1",
                   bastions=[], kill_group=True) as transport:
        child = subprocess.Popen(["sleep", "300"])  # an ssh client of the run
        print(transport.dir, child.pid, flush=True)
        time.sleep(300)
""")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_until(condition: object, what: str, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, f"not within {deadline_s} s: {what}"
        time.sleep(0.02)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv(ENV_RUNTIME_DIR, str(runtime))
    monkeypatch.setenv(ENV_KNOWN_HOSTS, str(tmp_path / "known_hosts"))
    return runtime


def test_a_run_killed_with_sigkill_leaves_no_key_and_no_ssh(runtime: Path) -> None:
    run = subprocess.Popen([sys.executable, "-c", STAND_IN], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                           env=os.environ.copy())
    assert run.stdout is not None
    run_dir, child = run.stdout.readline().split()
    assert (Path(run_dir) / "key").read_text() == KEY and alive(int(child))
    guard = guards_of(run_dir)
    assert len(guard) == 1 and os.getsid(guard[0]) == guard[0]  # in a session of its own
    run.send_signal(signal.SIGKILL)  # the run alone, no grace: its own cleanup never runs
    assert run.wait(30) == -signal.SIGKILL
    wait_until(lambda: not Path(run_dir).exists(), f"the guard removes {run_dir} (the key)")
    wait_until(lambda: not alive(int(child)), f"the guard kills the run's child {child}")
    run.stdout.close()


NORMAL_END = textwrap.dedent(f"""
    import os, sys
    from enclave.transport import Transport
    os.setpgid(0, 0)
    with Transport(stack="t", user="root", private_key={KEY!r}, previous_private_key=None, address="192.0.2.1",
                   bastions=[], kill_group=True) as transport:
        print(transport.dir, flush=True)
    print("ended", flush=True)
    sys.stdin.read()  # lives on until the test closes stdin
""")


def guards_of(run_dir: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and b"runguard.py" in b" ".join(argv) and run_dir.encode() in argv:
            found.append(int(entry.name))
    return found


def test_a_run_that_ends_normally_removes_its_files_and_its_guard_leaves_it_alone(runtime: Path) -> None:
    run = subprocess.Popen([sys.executable, "-c", NORMAL_END], cwd=ROOT, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    assert run.stdin is not None and run.stdout is not None
    run_dir = run.stdout.readline().strip()
    assert run.stdout.readline().strip() == "ended" and not Path(run_dir).exists()
    wait_until(lambda: not [pid for pid in guards_of(run_dir) if alive(pid)], "the guard exits after 'done'")
    assert run.poll() is None  # the guard killed nothing: the run's group lives on
    run.stdin.close()
    assert run.wait(30) == 0
    run.stdout.close()


def test_kill_group_needs_a_group_of_its_own(runtime: Path) -> None:
    if os.getpgrp() == os.getpid():
        pytest.skip("this test process leads its group")
    from enclave.transport import TransportError
    with pytest.raises(TransportError, match="lead its own process group"):
        with Transport(stack="t", user="root", private_key=KEY, previous_private_key=None, address="192.0.2.1",
                       bastions=[], kill_group=True):
            pass


FAKE_SSH = """#!/bin/sh
# a connection that hangs: stands in for OpenSSH (no traffic leaves this machine)
echo $$ >> "$FAKE_SSH_PIDS"
exec sleep 300
"""


@pytest.mark.parametrize("killed", ["the shell", "the run"])
def test_the_real_push_run_cancelled_as_pulumi_command_cancels_it_leaves_nothing(
        killed: str, runtime: Path, tmp_path: Path) -> None:
    """pulumi-command runs `/bin/sh -c COMMAND` and cancels with SIGKILL to that shell. dash (Debian's /bin/sh)
    forks the command, so the run is left behind the killed shell: it notices and stops as on SIGTERM. A shell
    that execs (bash) makes the run itself the one killed: its guard cleans up. Either way: no key, no ssh, no
    run, and the engine's stdout pipe closes (what pulumi-command waits for)."""
    from config.stackfile import load_stack_file
    from enclave.plan import build_plan
    from enclave.pushrun import COMMAND, ENV_PRIVATE_KEY, push_request

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    pids_file = tmp_path / "ssh-pids"
    pids_file.touch()
    plan = build_plan(load_stack_file(ROOT / "stacks" / "Pulumi.dev.yaml"))
    host = plan.policy.host_by_name["mysql-1"]
    request = push_request("dev", plan.policy, plan.addresses, host, plan.files["mysql-1"], user="root",
                           public_key="ssh-ed25519 AAAA", deadline_s=300)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SSH_PIDS": str(pids_file), ENV_PRIVATE_KEY: KEY}
    command = " ".join([sys.executable, *COMMAND.split()[1:]])
    shell = subprocess.Popen(["/bin/sh", "-c", command], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert shell.stdin is not None and shell.stdout is not None
    shell.stdin.write(request.to_stdin())
    shell.stdin.close()

    def ssh_pids() -> list[int]:
        return [int(line) for line in pids_file.read_text().split()]

    wait_until(lambda: bool(ssh_pids()) and any(runtime.glob("run-*")), "the run dialing, its key on disk")
    (run_dir,) = runtime.glob("run-*")
    run_pid = int(run_dir.name.split("-")[1])
    assert (run_dir / "key").read_text() == KEY
    os.kill(shell.pid if killed == "the shell" else run_pid, signal.SIGKILL)
    wait_until(lambda: not run_dir.exists(), f"{run_dir} (the key) removed")
    wait_until(lambda: not any(alive(pid) for pid in ssh_pids()), f"the run's ssh {ssh_pids()} killed")
    wait_until(lambda: not alive(run_pid), f"the run {run_pid} ended")
    assert shell.stdout.read() == ""  # EOF, nothing confirmed: no holder of the engine's stdout pipe is left
    shell.wait(30)
    shell.stdout.close()
