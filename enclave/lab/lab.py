"""The lab: a stack's network built out of Linux network namespaces on this machine, pushed and probed for real.

Topology (nothing is added to the machine's own namespace; every name carries the run id):

    enc-<run>-fabric       two bridges: `public` (the Internet) and `private` (the VPC)
    enc-<run>-<host>       one per stack host: the public and private interfaces named as in
                           `enclave:interfaces`, veth'd into the fabric's bridges, with the plan's example
                           addresses (enclave.plan.example_addresses), fixed MACs, and a real sshd
    enc-<run>-internet     on the public segment, outside `operators`
    enc-<run>-operator     on the public segment, inside `operators`: where `pulumi up` would run
    enc-<run>-neighbor     on the private segment: another tenant of the shared private network
    enc-<run>-scratch      a clean kernel the compiled files are loaded into, to learn what each host must show

Every namespace gets permanent neighbour entries for the addresses it talks to (Lab.neighbour_entries), so the
kernel's neighbour table, shared by every namespace on the machine, never decides a probe. One probe agent in
the fabric namespace (enclave.lab.agent) listens and sends in every namespace through setns.

Every public address is a /32 (or /128) with an on-link default route, so the plan's public ranges share one
L2 segment without a router. Veth pairs are created from inside the fabric namespace with the host end
placed straight into its namespace.

Each host boots like a droplet: the role's first-boot baseline (the cloud-init bootcmd text), then sshd at a
droplet's defaults (plus what the baseline writes into ENCLAVE_SSHD_CONFIG_DIR). The push is the Pulumi
program's command line, `python -m enclave.pushrun`, run from the operator namespace with the request on stdin
and the key in its environment (push_all starts them as the engine does: FIFO, at its parallelism, bastions
first); it pushes through the bastion's one shared OpenSSH connection and confirms over a new one.
Namespaces share the filesystem, so each host's sshd gives its sessions their own ENCLAVE_STATE_DIR
(sshd_config SetEnv); the scripts are byte for byte the program's.

`Lab` is a context manager: everything is removed on exit, on failure, on Ctrl-C and on SIGTERM.

`Lab` (this module: lifecycle, pushes, probes, the harness's health) composes the lab's parts:
    base.py       the plan, the options and every shared name (namespaces, directories, session environment)
    topology.py   namespaces, bridges, addresses, permanent neighbour entries
    hosts.py      keys, boot, sshd, the probe agent, readiness, reboot
    scheduler.py  push_all's order, as the Pulumi engine runs the pushes (unit-tested with fakes)
    proofs.py     every host's kernel state against the compiled one (enclave.kernelstate)
    cleanup.py    finding and removing runs by name (`enclave lab down`)
    machine.py    root, tools, the lab root, running commands
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType

from ..push import install_script
from ..pushrun import COMMAND, ENV_PREVIOUS_PRIVATE_KEY, ENV_PREVIOUS_STDOUT, ENV_PRIVATE_KEY, push_request
from ..render import RuleFiles
from ..transport import ENV_KNOWN_HOSTS, ENV_RUNTIME_DIR
from .base import EXHAUSTIVE_MAX_PROBES, OUTSIDERS
from .cleanup import (RUNTIME_DIR_MAX, LabRecord, destroy_run, lab_records, namespace_pids, run_namespaces,
                      short_runtime_dir)
from .hosts import WIPE_KERNEL_STATE, Hosts
from .machine import (LAB_DIR_ENV, PROJECT_ROOT, SSH_USER, STATE_FILE, LabError, LabUnavailable, _run, _run_all,
                      invoking_user, preflight)
from .probe import HarnessError, LabReport, Outcome, send_probes, tests_with_packets
from .proofs import Proofs
from .scheduler import PushFailed, PushHandle, run_pushes
from .topology import Topology

# The lab's public names, wherever they live: enclave.lab.cli, the tests and the benchmarks import them from here.
__all__ = ["EXHAUSTIVE_MAX_PROBES", "LAB_DIR_ENV", "PROJECT_ROOT", "WIPE_KERNEL_STATE", "Lab", "LabError", "LabRecord",
           "LabUnavailable", "PushFailed", "destroy_run", "invoking_user", "lab_records", "namespace_pids",
           "preflight", "run_namespaces"]


def neighbour_table_overflows() -> tuple[int, int]:
    """How often the kernel's IPv4 and IPv6 neighbour tables were full (table_fulls, summed over CPUs). The
    tables are shared by every namespace, so the machine's counters are the ones to read (read only)."""
    totals = []
    for name in ("arp_cache", "ndisc_cache"):
        try:
            lines = Path(f"/proc/net/stat/{name}").read_text().split("\n")
            header = lines[0].split()
            column = header.index("table_fulls")
            totals.append(sum(int(line.split()[column], 16) for line in lines[1:] if line.strip()))
        except (OSError, ValueError, IndexError):
            totals.append(0)
    return totals[0], totals[1]


def _block_signals() -> set[int | signal.Signals]:
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _RunningPush:
    """One `python -m enclave.pushrun` of push_all, as the scheduler sees it (enclave.lab.scheduler.PushHandle)."""

    def __init__(self, lab: Lab, host: str, proc: subprocess.Popen[str], stdin: str) -> None:
        self.lab, self.host, self.proc, self.stdin = lab, host, proc, stdin

    def wait(self) -> None:
        stdout, stderr = self.proc.communicate(self.stdin)
        self.lab._finish_push(self.host, self.proc, stdout, stderr)

    def kill(self) -> None:
        # As the engine cancels a push: SIGKILL to the command's process alone (`ip netns exec` execs python, so
        # that is the run), no grace; its guard then kills its ssh and removes its key (enclave/runguard.py).
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass  # it ended by itself meanwhile


class Lab(Topology, Hosts, Proofs):
    """One stack's lab. `with Lab(stack) as lab:` builds it (`up()`) and always removes it (`down()`).

    files_override: rule files to push instead of the compiled ones for some hosts (the expectations stay
      the compiled policy's, so a wrong file shows up as mismatches).
    host_env: extra environment for every SSH session and console command on the hosts (e.g.
      ENCLAVE_ROLLBACK_SECONDS for a short rollback window in tests).
    progress: told about each phase (network, boot, push per host, probes answered); shows nothing by default.
    exhaustive: probe every source to every host (True), or the first and last host of each role (False);
      None (default): exhaustive while that costs at most EXHAUSTIVE_MAX_PROBES probes. Either way every host's
      live rules, sets and digest are proven equal to the compiled ones.
    host_wrapper: per host, an argv prefix every command on that host runs through (inside its namespace),
      e.g. a test's emulation of a stock image's /usr/sbin (tests/lab/stock_image).
    starve_neighbours: a failure injected into the harness, for tests: these namespaces get no static
      neighbour entries and cannot resolve any neighbour, as when the kernel's shared neighbour table is full.
    """

    # --------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Lab:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._previous_handlers[sig] = signal.signal(sig, _sigterm_as_interrupt)
        try:
            self.up()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if not self.kept:
                self.down()
        except LabError as teardown:
            if exc is None:
                raise
            # The error that stopped the lab is the one to report; the teardown's rides along with it.
            exc.add_note(f"and the teardown failed too: {teardown}")
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
            self._previous_handlers.clear()

    def up(self) -> None:
        """Build the network, boot every host (baseline, sshd) and start the probe agents. Pushes nothing."""
        preflight()
        started = time.monotonic()
        self.progress.begin("network", None, f"lab {self.run_id}: {len(self.namespaces)} namespaces, two bridges")
        (self.dir / "agents").mkdir(parents=True, mode=0o700)
        self._write_state()
        self._make_keys()
        self._build_network()
        self.timings["network"] = time.monotonic() - started
        self.progress.end(
            "network",
            f"lab {self.run_id} (stack {self.stack.name}): {len(self.namespaces)} namespaces, public and private bridges",
        )
        started = time.monotonic()
        names = [*(h.name for h in self.hosts), *OUTSIDERS]
        self.progress.begin("boot", len(self.hosts), "baseline and sshd per host, one probe agent for every namespace")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self._start_agent()
        _run_all([(self.in_ns(h.name, ["sh", "-s"], self.session_env(h.name)), self._boot_script(h)) for h in self.hosts])
        _run_all([(self.in_ns(h.name, [self._sshd(), "-f", str(self._write_sshd_config(h.name)),
                                        "-E", str(self.host_dir(h.name) / "sshd.log")]), None) for h in self.hosts])
        self._wait_until_ready(names)
        # cloud-init's final stage, once per droplet: install what a stock image lacks, then the full baseline
        # (a droplet whose install fails boots on regardless: the push names what is missing)
        results = _run_all([(self.in_ns(h.name, ["sh", "-s"], self.session_env(h.name)), install_script())
                            for h in self.hosts], timeout=300, check=False)
        self.install_failures = {h.name: r.stderr.strip() for h, r in zip(self.hosts, results) if r.returncode}
        self.timings["boot"] = time.monotonic() - started
        self.progress.end("boot", f"{len(self.hosts)} hosts on their baseline with sshd; one probe agent serves "
                                  f"{len(names)} namespaces")

    def down(self) -> None:
        """Remove everything of this run. Ctrl-C and SIGTERM wait until it is done."""
        started = time.monotonic()
        blocked = _block_signals()
        try:
            if self._agent is not None:
                self._agent.kill()
                self._agent.wait()  # reap: the agent is our child
                self._agent = None
            destroy_run(self.run_id, self.dir.parent)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.timings["teardown"] = time.monotonic() - started

    def keep(self) -> None:
        """Leave the lab running after this process exits (`enclave lab up`); `enclave lab down` removes it."""
        self.kept = True
        self._write_state()

    def _write_state(self) -> None:
        state = {
            "run_id": self.run_id,
            "stack": self.stack.name,
            "stack_file": str(self.stack.path) if self.stack.path else None,
            "owner_pid": os.getpid(),
            "user": invoking_user(),
            "kept": self.kept,
            "namespaces": self.namespaces,
            "ssh_config": str(self.ssh_config_path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (self.dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------ ssh

    def ssh(self, host: str, command: str = "sh -s", *, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A NEW OpenSSH connection from the operator namespace to `host` (through the bastion if it is not
        one), running `command`, from the config `enclave ssh-config` prints: what an operator types to look at
        a host. Never raises on a non-zero exit: callers look at the result. (Pushes go through push().)"""
        argv = self.in_ns("operator", ["ssh", "-F", str(self.ssh_config_path), self.alias(host), command])
        return _run(argv, input=input, check=False, timeout=timeout)

    def operator_env(self) -> dict[str, str]:
        """The environment of a push run (or `enclave audit`) from the operator namespace: the lab's own runtime
        directory (two labs of one stack share addresses, so they must not share ControlMaster sockets) and its
        known_hosts (as a first push leaves it)."""
        runtime = self.dir / "s"
        if len(str(runtime)) > RUNTIME_DIR_MAX:  # the ControlMaster socket's path must fit in 107 bytes
            runtime = short_runtime_dir(self.run_id)
        return {
            **os.environ,
            ENV_RUNTIME_DIR: str(runtime),
            ENV_KNOWN_HOSTS: str(self.dir / "known_hosts"),
        }

    def _start_push(self, host: str, files: RuleFiles | None, deadline_s: float,
                    bastions: Sequence[str] | None) -> tuple[subprocess.Popen[str], str]:
        """`python -m enclave.pushrun` for one host, exactly as the program's local.Command runs it: COMMAND with
        this venv's python, from the project directory, the request on stdin, the key(s) and the previous run's
        stdout in the environment. Its own session, so a cancelled run can be killed with its ssh children."""
        h = self.policy.host_by_name[host]
        request = push_request(
            self.stack.name, self.policy, self.addresses, h, files or self.files[host], user=SSH_USER,
            public_key=self.public_key, deadline_s=int(deadline_s), bastions=bastions,
        )
        env = self.operator_env()
        env[ENV_PRIVATE_KEY] = self.private_key
        env.pop(ENV_PREVIOUS_PRIVATE_KEY, None)
        if self.previous_private_key:
            env[ENV_PREVIOUS_PRIVATE_KEY] = self.previous_private_key
        env.pop(ENV_PREVIOUS_STDOUT, None)
        if host in self.push_stdout:  # pulumi-command: an update sees the stdout its last successful run kept
            env[ENV_PREVIOUS_STDOUT] = self.push_stdout[host]
        argv = self.in_ns("operator", [sys.executable, *COMMAND.split()[1:]])
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=PROJECT_ROOT, env=env, start_new_session=True)
        return proc, request.to_stdin()

    def _finish_push(self, host: str, proc: subprocess.Popen[str], stdout: str, stderr: str) -> str:
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        if proc.returncode == 0:
            self.push_stdout[host] = stdout  # what Pulumi would keep in the state
            return stderr + stdout
        try:
            step = str(json.loads(stdout.strip().splitlines()[-1])["failed"])
        except (ValueError, IndexError, KeyError, TypeError):
            step = "killed" if proc.returncode < 0 else "push"
        raise PushFailed(host, step, result)

    def push(self, host: str, files: RuleFiles | None = None, *, redial_s: float = 0.0,
             bastions: Sequence[str] | None = None) -> str:
        """Install a host's rules as the Pulumi program does: one `python -m enclave.pushrun` run, which pushes
        and confirms over a new connection. Returns what it printed (the host's words, then its JSON line);
        raises PushFailed naming the step.

        redial_s: the request's deadline_s, how long the run keeps retrying (the program's is minutes): after a
        push that cut SSH, the host rolls back and the late confirmation then reports it. 0 (`lab check`): one
        attempt, so the probes see the rules that were pushed.
        bastions: the public addresses the request names (default: the stack's bastions), e.g. a replacement's.
        """
        proc, stdin = self._start_push(host, files, redial_s, bastions)
        stdout, stderr = proc.communicate(stdin)
        return self._finish_push(host, proc, stdout, stderr)

    def push_all(self, parallel: int | None = None, *, continue_on_error: bool = True,
                 kill_after: int | None = None, redial_s: float = 0.0) -> dict[str, PushFailed]:
        """Every host as `pulumi up` runs their pushes: at most `parallel` runs at once (the engine's default,
        4 x CPUs), started first in, first out, the bastions' first (every other push depends on them: it goes
        through them). Without continue_on_error, the first failure starts nothing more (the engine cancels
        what is queued; running pushes finish), as a plain `pulumi up` does; with it (`lab check`,
        `--continue-on-error`) every host is tried and hosts behind a failed bastion push are not started.
        kill_after: cancel the run once that many pushes finished: SIGKILL every running push, alone, as the
        engine does (a Ctrl-C'd or killed `pulumi up`), start nothing more.

        Returns the hosts that did not confirm (step `not started` for those never run).
        """
        started = time.monotonic()
        parallel = parallel or 4 * (os.cpu_count() or 1)
        bastions = [h.name for h in self.policy.bastion_hosts()]
        others = [h.name for h in self.hosts if h.name not in bastions]
        self.progress.begin("push", len(self.hosts), f"{parallel} at once, bastions first ({', '.join(bastions) or 'none'})")

        def start(host: str) -> PushHandle:
            proc, stdin = self._start_push(host, None, redial_s, None)
            return _RunningPush(self, host, proc, stdin)

        def finished(host: str, failure: PushFailed | None) -> None:
            self.progress.advance("push", detail=f"{host}: {failure.step} FAILED" if failure else f"{host} confirmed")

        failures = run_pushes(bastions, others, start, parallel=parallel, continue_on_error=continue_on_error,
                              kill_after=kill_after, finished=finished)
        self.push_failures = failures
        self.timings["push"] = time.monotonic() - started
        summary = f"{len(self.hosts) - len(failures)} of {len(self.hosts)} hosts pushed and confirmed over SSH"
        if failures:
            summary += "; FAILED: " + ", ".join(f"{h} ({f.step})" for h, f in sorted(failures.items()))
        self.progress.end("push", summary)
        return failures

    # --------------------------------------------------------------------------------------- probe

    def probe(self) -> LabReport:
        """Every host's live firewall against the compiled one; every flow with real packets (every pair, or
        the sample), compared with the compiled policy; the stack's tests; and the harness's health first."""
        started = time.monotonic()
        proofs = self.prove_hosts()
        self.timings["prove"] = time.monotonic() - started
        started = time.monotonic()
        probe_set = self.probe_set
        agents = {name: str(self.agent_socket()) for name in [*(h.name for h in self.hosts), *OUTSIDERS]}
        mode = "every pair" if probe_set.exhaustive else f"sample of {len(probe_set.hosts)} hosts"
        self.progress.begin("probe", len(probe_set.probes), f"from {len(probe_set.sources)} sources at once ({mode})")
        overflows_before = neighbour_table_overflows()
        harness: list[str] = []
        try:
            outcomes = send_probes(agents, probe_set.probes, lambda n: self.progress.advance("probe", n))
        except HarnessError as exc:
            harness.append(str(exc))
            outcomes = []
        overflows_after = neighbour_table_overflows()
        harness += self.harness_problems(outcomes, overflows_after[0] - overflows_before[0],
                                         overflows_after[1] - overflows_before[1])
        tests = tests_with_packets(self.policy, self.addresses, self.others, outcomes, probe_set.sample)
        self.timings["probe"] = time.monotonic() - started
        passed = sum(o.passed for o in outcomes)
        wrong = sum(not o.matches for o in outcomes)
        if harness:
            verdict = "HARNESS FAILED, no verdict on the rules: " + harness[0]
        else:
            verdict = f"{wrong} disagree with the policy" if wrong else "all as the policy says"
        self.progress.end("probe", f"{len(outcomes)} probes ({mode}): {passed} got through, "
                                   f"{len(outcomes) - passed} dropped, {verdict}")
        failures = [str(f) for f in self.push_failures.values()]
        return LabReport(self.stack.name, self.run_id, probe_set, outcomes, tests, self.plan.tests, failures,
                         self.timings, proofs, harness)

    # ---------------------------------------------------------------------------------- harness

    def harness_problems(self, outcomes: list[Outcome], overflows4: int, overflows6: int) -> list[str]:
        """Why the probes of this run cannot be trusted, if they cannot: a lab namespace that could not resolve
        an IPv4 neighbour (ARP is not filtered by iptables, so its packets never leaving is never the rules'
        doing), an IPv6 one while the shared IPv6 table overflowed (otherwise an unresolved IPv6 neighbour may
        well be rules that drop neighbour discovery: a verdict, not a harness failure), a static entry gone, or
        a probe the source's own kernel refused to send."""
        problems = []
        errors: dict[str, list[str]] = {}
        for o in outcomes:
            if o.kernel_error:
                errors.setdefault(o.detail, []).append(o.probe.describe())
        for detail, probes in sorted(errors.items()):
            problems.append(f"{len(probes)} probe(s) failed in the sending kernel ({detail}), e.g. {probes[0]}")
        participants = sorted({*(h.name for h in self.probe_set.hosts), *OUTSIDERS,
                               *(h.name for h in self.policy.bastion_hosts())})
        wanted = self.neighbour_entries()

        def check(name: str) -> list[str]:
            shown = self.run(name, ["ip", "-4", "neigh", "show"], timeout=60).stdout.splitlines()
            if overflows6:
                shown += self.run(name, ["ip", "-6", "neigh", "show"], timeout=60).stdout.splitlines()
            unresolved = [line.split()[0] for line in shown if line.rstrip().endswith(("FAILED", "INCOMPLETE"))]
            permanent = sum(line.rstrip().endswith("PERMANENT") for line in shown)
            found = []
            if unresolved:
                found.append(f"{self.namespace(name)} could not resolve {len(unresolved)} neighbour(s) "
                             f"({', '.join(unresolved[:4])}): its packets to them never left, and those probes "
                             "timed out as if a firewall had dropped them")
            if permanent < len(wanted.get(name, ())):
                found.append(f"{self.namespace(name)} has {permanent} of its {len(wanted[name])} static "
                             "neighbour entries")
            return found

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for found in pool.map(check, participants):
                problems += found
        if problems and (overflows4 or overflows6):
            problems.append(f"the kernel's neighbour tables overflowed {overflows4} (IPv4) and {overflows6} (IPv6) "
                            "time(s) during the probes (table_fulls in /proc/net/stat/arp_cache and ndisc_cache; "
                            "their dynamic entries (gc_thresh3) are shared by every namespace on this machine: "
                            "`dmesg | grep 'neighbor table overflow'`)")
        return problems

    def explore_help(self) -> list[str]:
        """Commands an operator can paste to look around a kept lab, each with what it shows."""
        first = next((h.name for h in self.hosts if not self.stack.config.roles[h.role].bastion), self.hosts[0].name)
        commands = [
            (f"ip netns exec {self.namespace(first)} bash", f"a shell on {first}"),
            (f"ip netns exec {self.namespace(first)} iptables -vL ENCLAVE-INPUT", "its rules and their counters"),
            (f"ip netns exec {self.namespace('operator')} ssh -F {self.ssh_config_path} {self.alias(first)}",
             "ssh through the bastion, as the operator"),
            (f"ip netns exec {self.namespace('internet')} bash", "the Internet's view"),
            (f"enclave lab down {self.run_id}", "remove the lab"),
        ]
        width = max(len(command) for command, _ in commands)
        return [f"{command.ljust(width)}  # {why}" for command, why in commands]
