"""How a push reaches a host: the real OpenSSH client, one multiplexed connection per bastion.

Every push of a `pulumi up` is its own process (one `local.Command` each), so what they share lives in files
under a private runtime directory (ENV_RUNTIME_DIR, default $XDG_RUNTIME_DIR/enclave or /tmp/enclave-<uid>):

  cm-<hash>        the ControlMaster socket of one (stack, bastion, user): ONE SSH connection to the bastion,
                   shared by every push of the run; each push to a host behind it is a new channel through it
                   (`ssh -J`, i.e. `ssh -W` over the master: a new TCP connection from the bastion to the host).
                   The master is started explicitly under an flock (many processes starting at once would each
                   become a master with `ControlMaster auto`, and the losers fall back to their own
                   connections) and lingers CONTROL_PERSIST_S after its last push.
  cm-<hash>.slot-N a semaphore of HANDSHAKE_SLOTS flock'd files per bastion: at most that many SSH commands go
                   through (or to) one bastion at once, across processes, so its sshd never sees more
                   concurrent handshakes than its MaxStartups admits at droplet defaults (10:30:100).
  run-<pid>-<rnd>/ one run's private files: the key(s) from the environment (0600) and the generated ssh config.
                   Removed when the run ends, also on SIGTERM/SIGINT/SIGHUP; when the run is SIGKILLed (how the
                   Pulumi engine cancels a push), by the run's guard (enclave/runguard.py), which also kills the
                   run's ssh clients; the next run removes any directory whose process is gone, as a backstop.

The generated config gives every hop its own ConnectTimeout and keepalives (a `-o` on the command line would
reach the host but not the bastion hop that `-J` starts). Host keys: StrictHostKeyChecking accept-new against a
per-stack known_hosts (ENV_KNOWN_HOSTS, default $XDG_STATE_HOME/enclave/<stack>/known_hosts): a new droplet's
key is recorded at its first push; a key that changed afterwards (a droplet rebuilt from the panel, or someone
in the middle) is refused, the push fails naming the host and the `ssh-keygen -R` that accepts the new key
once you checked it, and `enclave audit` reports the host as `host key changed`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

ENV_RUNTIME_DIR = "ENCLAVE_SSH_RUNTIME_DIR"
ENV_KNOWN_HOSTS = "ENCLAVE_KNOWN_HOSTS"

CONNECT_TIMEOUT_S = 10  # per hop: TCP connect and SSH banner
SERVER_ALIVE_INTERVAL_S = 5  # per hop: a silent peer is given up after 5 s x 3
SERVER_ALIVE_COUNT_MAX = 3
CONTROL_PERSIST_S = 60  # a bastion's shared connection lingers this long after its last push
HANDSHAKE_SLOTS = 10  # concurrent SSH commands through one bastion (sshd's MaxStartups starts dropping at 10)
COMMAND_TIMEOUT_S = 120  # one ssh command at most this long beyond the run's deadline
SSH_FAILED = 255  # ssh's own exit status when it could not connect or log in

HOST_KEY_CHANGED = "REMOTE HOST IDENTIFICATION HAS CHANGED"
RUNGUARD = Path(__file__).with_name("runguard.py")
RUNGUARD_DONE = b"done"  # enclave.runguard.DONE (the guard imports nothing of enclave)


class TransportError(Exception):
    """The operator's machine cannot run a push (runtime directory unsafe, ssh missing)."""


def runtime_dir() -> Path:
    """The private directory shared by every push of this user (sockets, locks, the runs' key files)."""
    explicit = os.environ.get(ENV_RUNTIME_DIR)
    if explicit:
        path = Path(explicit)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "enclave"
    else:
        path = Path(f"/tmp/enclave-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise TransportError(
            f"{path} must be a directory of yours that nobody else can read (it holds the push's key): "
            f"`chmod 700 {path}`, or point {ENV_RUNTIME_DIR} at another directory"
        )
    return path


def known_hosts_file(stack: str) -> Path:
    explicit = os.environ.get(ENV_KNOWN_HOSTS)
    if explicit:
        path = Path(explicit)
    else:
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        path = state / "enclave" / stack / "known_hosts"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def control_path(directory: Path, stack: str, bastion: str, user: str) -> Path:
    """The same in every process of every run. A Unix socket path is at most 107 bytes and ssh binds a random
    17-character suffix first, so a runtime directory too long for that gets its sockets in /tmp/enclave-<uid>,
    named by the directory too (two labs of one stack share addresses, never sockets)."""
    key = hashlib.sha256(f"{stack}\0{bastion}\0{user}".encode()).hexdigest()[:12]
    path = directory / f"cm-{key}"
    if len(str(path)) > 90:
        short = Path(f"/tmp/enclave-{os.getuid()}")
        short.mkdir(mode=0o700, exist_ok=True)
        if short.stat().st_uid != os.getuid() or short.stat().st_mode & 0o077:
            raise TransportError(f"{short} must be a directory of yours that nobody else can read: `chmod 700 {short}`")
        path = short / ("cm-" + hashlib.sha256(f"{directory}\0{key}".encode()).hexdigest()[:20])
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_runs(directory: Path) -> None:
    """Remove the private files of runs that were killed before they could (SIGKILL)."""
    for entry in directory.glob("run-*"):
        try:
            pid = int(entry.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def host_key_changed(self) -> bool:
        return HOST_KEY_CHANGED in self.stderr

    @property
    def changed_host_key_address(self) -> str | None:
        """Whose key changed (the host, or a bastion on the way): OpenSSH names it."""
        match = re.search(r"Host key for (\S+) has changed", self.stderr)
        return match.group(1).strip("[]").split("]:")[0] if match else None


class TransportLike(Protocol):
    """What a push run and an audit need of a transport (enclave.pushrun.run, enclave.audit.audit_host): the
    seam where tests put a fake host in place of OpenSSH."""

    @property
    def known_hosts(self) -> Path:
        """The known_hosts file the operator fixes a changed host key in (named in error messages)."""
        ...

    def run(self, via: str | None, command: str, stdin: str, *, confirm: bool, deadline: float) -> Result:
        """`command` on the host with `stdin`, directly (via None) or through bastion `via`; confirm=True logs
        in with the new key only, on a new connection. SSH_FAILED when SSH did not get in."""
        ...


class TransportFactory(Protocol):
    """Builds a run's transport as a context manager (Transport itself is one)."""

    def __call__(self, *, stack: str, user: str, private_key: str, previous_private_key: str | None,
                 address: str, bastions: Sequence[str]) -> contextlib.AbstractContextManager[TransportLike]: ...


class Transport:
    """One run's SSH setup: the key files, the generated config and the bastions' shared connections.

    Use as a context manager: its private files are removed on exit.
    """

    def __init__(self, *, stack: str, user: str, private_key: str, previous_private_key: str | None,
                 address: str, bastions: Sequence[str], kill_group: bool = False) -> None:
        """kill_group: this process leads its own process group (enclave.pushrun makes it so), and its guard
        SIGKILLs that group if the process dies; else the guard only removes the files."""
        self.stack, self.user, self.address = stack, user, address
        self.kill_group = kill_group
        self.bastions = list(dict.fromkeys(b for b in bastions if b))
        self.runtime = runtime_dir()
        self.known_hosts = known_hosts_file(stack)
        self.dir = self.runtime / f"run-{os.getpid()}-{secrets.token_hex(4)}"
        self._keys = (private_key, previous_private_key)

    def __enter__(self) -> Transport:
        sweep_stale_runs(self.runtime)
        self._guard = self._start_guard()  # before the key exists: no moment where a kill strands it
        self.dir.mkdir(mode=0o700)
        self.key = self._write_key("key", self._keys[0])
        self.previous_key = self._write_key("previous", self._keys[1]) if self._keys[1] else None
        self.config = self.dir / "ssh_config"
        self.config.write_text(self._config_text())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.kill_group and exc_type is not None:
            # a failed push or a signal: keep the pipe open, so that once this process has exited (closing it)
            # the guard kills whatever is left of its group
            return
        os.write(self._guard, RUNGUARD_DONE)  # a normal end: the guard leaves this process's group alone
        os.close(self._guard)

    def _start_guard(self) -> int:
        """enclave/runguard.py watching this process; returns the pipe's write end (this process's only copy:
        os.pipe() fds are not inherited by the ssh children)."""
        if self.kill_group and os.getpgrp() != os.getpid():
            raise TransportError("kill_group: this process must lead its own process group (os.setpgid(0, 0))")
        read_end, write_end = os.pipe()
        try:
            subprocess.Popen(
                [sys.executable, "-I", str(RUNGUARD), str(read_end), str(self.dir), str(os.getpid() if self.kill_group else 0)],
                pass_fds=(read_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # outside the group it kills, and away from the terminal's Ctrl-C
            )
        except OSError as exc:
            os.close(write_end)
            raise TransportError(f"cannot start the run's guard ({RUNGUARD}): {exc.strerror}") from None
        finally:
            os.close(read_end)
        return write_end

    def _write_key(self, name: str, text: str | None) -> Path:
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write((text or "").strip() + "\n")  # OpenSSH refuses a key without its final newline
        return path

    # --------------------------------------------------------------------------------- config

    def bastion_alias(self, bastion: str) -> str:
        return f"enclave-bastion-{self.bastions.index(bastion)}"

    def control_path(self, bastion: str) -> Path:
        return control_path(self.runtime, self.stack, bastion, self.user)

    def _config_text(self) -> str:
        both = [f"  IdentityFile {self.key}"] + ([f"  IdentityFile {self.previous_key}"] if self.previous_key else [])
        lines = [f"# enclave push of stack {self.stack}: generated for one run, removed after it"]
        for bastion in self.bastions:
            # Log in with whichever key the bastion knows (new first); its connection is shared through the master.
            lines += [f"Host {self.bastion_alias(bastion)}", f"  HostName {bastion}", *both,
                      f"  ControlPath {self.control_path(bastion)}", "  ControlMaster no"]
        # The host: the push logs in with either key; the confirm only with the new one, on a connection of its
        # own (ControlPath none: a bastion's confirm never rides on the shared master).
        lines += ["Host enclave-push", f"  HostName {self.address}", *both]
        if self.address in self.bastions:
            lines += [f"  ControlPath {self.control_path(self.address)}", "  ControlMaster no"]
        else:
            lines += ["  ControlPath none"]
        lines += ["Host enclave-confirm", f"  HostName {self.address}", f"  IdentityFile {self.key}", "  ControlPath none"]
        lines += [
            "Host *",
            f"  User {self.user}",
            "  IdentitiesOnly yes",
            "  BatchMode yes",
            f"  ConnectTimeout {CONNECT_TIMEOUT_S}",
            f"  ServerAliveInterval {SERVER_ALIVE_INTERVAL_S}",
            f"  ServerAliveCountMax {SERVER_ALIVE_COUNT_MAX}",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking accept-new",
            "  CheckHostIP no",
            "  UpdateHostKeys no",
            "  ForwardAgent no",
            "  ClearAllForwardings yes",
            "  LogLevel ERROR",
        ]
        return "\n".join(lines) + "\n"

    # --------------------------------------------------------------------------------- locks

    @contextlib.contextmanager
    def _slot(self, bastion: str, deadline: float) -> Iterator[None]:
        """One of HANDSHAKE_SLOTS flock'd files of this bastion; waits (at most until the deadline) for one."""
        base = self.control_path(bastion)
        give_up = max(deadline, time.monotonic() + 120)  # a run with no time left still waits its turn
        while True:
            for i in random.sample(range(HANDSHAKE_SLOTS), HANDSHAKE_SLOTS):
                fd = os.open(f"{base}.slot-{i}", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield
                finally:
                    os.close(fd)  # closing releases the lock
                return
            if time.monotonic() > give_up:
                yield  # better one handshake over the cap than a push that never starts
                return
            time.sleep(0.05 + random.random() * 0.1)

    def _ssh(self, argv: Sequence[str], stdin: str | None, timeout: float) -> Result:
        try:
            done = subprocess.run(["ssh", "-F", str(self.config), *argv], input=stdin, text=True,
                                  capture_output=True, timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired as expired:
            err = expired.stderr if isinstance(expired.stderr, str) else (expired.stderr or b"").decode(errors="replace")
            return Result(SSH_FAILED, "", f"{err}ssh did not finish within {timeout:.0f} s".strip())
        return Result(done.returncode, done.stdout, done.stderr)

    def ensure_master(self, bastion: str, deadline: float) -> Result:
        """The bastion's shared connection: reuse a live one, else start it (one process at a time)."""
        alias = self.bastion_alias(bastion)
        lock = os.open(f"{self.control_path(bastion)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._ssh(["-O", "check", alias], None, 10).returncode == 0:
                return Result(0, "", "")
            # A socket left by a master that was killed: ssh would refuse to bind it and silently run a plain
            # connection instead, leaving every other push without a master.
            self.control_path(bastion).unlink(missing_ok=True)
            log = self.dir / f"master-{self.bastions.index(bastion)}.log"
            with self._slot(bastion, deadline), open(log, "w") as err:
                # -f: ssh backgrounds itself once logged in, so its exit says whether the master is up. It must
                # not hold our stdout/stderr: Pulumi reads them until EOF, and the master outlives this run.
                started = subprocess.run(
                    ["ssh", "-F", str(self.config), "-o", "ControlMaster=yes", "-o", f"ControlPersist={CONTROL_PERSIST_S}",
                     "-N", "-f", alias],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                    timeout=max(deadline - time.monotonic(), 1.0) + CONNECT_TIMEOUT_S,
                )
            return Result(started.returncode, "", log.read_text(errors="replace"))
        except subprocess.TimeoutExpired:
            return Result(SSH_FAILED, "", f"the connection to bastion {bastion} did not come up")
        finally:
            os.close(lock)

    def run(self, via: str | None, command: str, stdin: str, *, confirm: bool, deadline: float) -> Result:
        """`command` on the host with `stdin`: directly (via None) or through bastion `via`.

        The push (confirm=False) logs in with either key, a bastion's over its shared connection; the confirm
        logs in with the new key only, on a new connection (through the bastion: a new TCP connection from it).
        """
        alias = "enclave-confirm" if confirm else "enclave-push"
        # A last resort only (ConnectTimeout and the keepalives end a dead connection): one attempt always gets
        # COMMAND_TIMEOUT_S, however little of the deadline is left, so a slow but working push is never cut.
        timeout = max(deadline - time.monotonic(), 0) + COMMAND_TIMEOUT_S
        shared = via if via is not None else (self.address if self.address in self.bastions and not confirm else None)
        if shared is not None:
            master = self.ensure_master(shared, deadline)
            if master.returncode != 0:
                return Result(SSH_FAILED, "", f"bastion {shared} unreachable: {master.stderr.strip() or 'no output'}")
        argv = (["-J", self.bastion_alias(via)] if via is not None else []) + [alias, command]
        gate = self._slot(via, deadline) if via is not None else (
            self._slot(self.address, deadline) if self.address in self.bastions else contextlib.nullcontext())
        with gate:
            return self._ssh(argv, stdin, timeout)
