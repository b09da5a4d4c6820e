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
"""

from __future__ import annotations

import concurrent.futures
import difflib
import json
import os
import pwd
import queue as queue_module
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from config.stackfile import Stack

from ..compiler import Host
from ..plan import build_plan, outsiders
from ..push import baseline_script, confirm_script, digest, install_script, push_script
from ..pushrun import COMMAND, ENV_PREVIOUS_PRIVATE_KEY, ENV_PREVIOUS_STDOUT, ENV_PRIVATE_KEY, push_request
from ..render import RuleFiles, baseline_files
from ..transport import ENV_KNOWN_HOSTS, ENV_RUNTIME_DIR
from ..sshconfig import ssh_config
from .probe import (AddressKind, HarnessError, HostProof, LabReport, Outcome, ProbeSet, exhaustive_probe_count,
                    listen_ports, plan_probes, probe_ports, sample_hosts, send_probes, tests_with_packets)
from .progress import LabProgress

NS_PREFIX = "enc-"
LAB_DIR_ENV = "ENCLAVE_LAB_DIR"
LAB_DIR_DEFAULT = Path("/run/enclave-lab")
# A run id names namespaces (enc-<run>-<host>) and a directory under the lab root that `lab down` deletes: letters
# and digits only, so `enclave lab down ..` (or `/`) can never point the deletion outside the lab root.
RUN_ID_FORMAT = re.compile(r"[0-9A-Za-z]{1,32}")
STATE_FILE = "lab.json"
# A push run's runtime directory holds ControlMaster sockets: <dir>/cm-<22 chars> plus ssh's 17-character
# temporary suffix must fit a Unix socket path (107 bytes).
RUNTIME_DIR_MAX = 60
OUTSIDERS = ("internet", "operator", "neighbor")
# Exhaustive (every source to every host) while it costs at most this many probes: about 20 prod-shaped hosts,
# a few seconds. Beyond it the lab samples (first and last host of each role) and proves every host's rules
# from its kernel, which is as strong (see README, "The lab") and linear in hosts instead of quadratic.
EXHAUSTIVE_MAX_PROBES = 20_000
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
SSH_USER = "root"  # the push needs root, and the lab's namespaces only know this machine's users

# tool -> the Debian package that provides it (the Makefile's APT_PACKAGES installs them all)
REQUIRED_TOOLS = {
    "ip": "iproute2",
    "iptables-restore": "iptables",
    "ip6tables-restore": "iptables",
    "ipset": "ipset",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sysctl": "procps",
}
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
# What a reboot loses: every rule and set (the filter table is the one enclave and the tutorial use).
WIPE_KERNEL_STATE = """for t in iptables ip6tables; do
  for c in INPUT FORWARD OUTPUT; do $t -w -P $c ACCEPT; done
  $t -w -F && $t -w -X
done
ipset destroy
"""


class LabError(Exception):
    """The lab could not be built or pushed (exit 1: a check that failed)."""


class LabUnavailable(LabError):
    """This machine cannot run a lab (not root, a tool missing): exit 2, with the fix in the message."""


class PushFailed(LabError):
    """One host's `python -m enclave.pushrun` did not confirm. step: what its JSON says failed (request, push,
    confirm), or `killed` (the run was cancelled while it ran) or `not started` (cancelled before it started)."""

    def __init__(self, host: str, step: str, result: subprocess.CompletedProcess[str]) -> None:
        self.host, self.step, self.result = host, step, result
        output = (result.stderr.strip() or result.stdout.strip() or "no output")[-3000:]
        super().__init__(f"{step} to {host} failed (exit {result.returncode}): {output}")


def normalized_firewall(tables: str, sets: str) -> str:
    """iptables-save/ip6tables-save and `ipset save` output as an operator compares them before and after:
    without comment lines (timestamps) and counters, ipset's random `initval` stripped, set lines sorted
    (a hash set has no member order)."""
    rules = [re.sub(r" \[\d+:\d+\]$", "", line) for line in tables.splitlines() if not line.startswith("#")]
    members = sorted(re.sub(r" initval 0x[0-9a-f]+", "", line) for line in sets.splitlines() if line.strip())
    return "\n".join(rules + members) + "\n"


def invoking_user() -> str:
    """Who runs this command: the user behind sudo when there is one (the lab itself always runs as root)."""
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        return sudo
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


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


def _without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def lab_root() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or LAB_DIR_DEFAULT)


def tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def preflight() -> None:
    if os.geteuid() != 0:
        raise LabUnavailable("the lab builds network namespaces and needs root: run it as root (e.g. sudo make lab)")
    missing = sorted({f"{name} (apt package {package})" for name, package in REQUIRED_TOOLS.items() if not tool(name)})
    if missing:
        raise LabUnavailable(f"missing tools: {', '.join(missing)}; `make setup` as root installs them")
    # The lab's sshd runs without PAM (this machine's login policy is not the droplets'), and without PAM
    # sshd refuses any login to an account whose password field is locked ("!…"), keys included.
    try:
        shadow = Path("/etc/shadow").read_text().splitlines()
    except OSError:
        shadow = []
    if any(line.startswith(f"{SSH_USER}:!") for line in shadow):
        raise LabUnavailable(
            f"{SSH_USER}'s password is locked in /etc/shadow, so the lab's sshd would refuse key logins too; "
            f"`usermod -p '*' {SSH_USER}` allows key logins without allowing any password"
        )


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=input, text=True, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv[:6])}… failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def _run_all(commands: Sequence[tuple[Sequence[str], str | None]], timeout: float = 60,
             check: bool = True) -> list[subprocess.CompletedProcess[str]]:
    """Several commands at once (each with optional stdin); with check, raise on the first that failed."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_run, argv, input=stdin, timeout=timeout, check=check) for argv, stdin in commands]
        return [future.result() for future in futures]


# ------------------------------------------------------------------------------------- namespaces


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def run_namespaces(run_id: str) -> list[str]:
    """Every namespace of one lab run that exists now (by name: enc-<run>-*)."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(f"{NS_PREFIX}{run_id}-"))


def namespace_pids(names: Sequence[str]) -> dict[int, str]:
    """Live processes inside these namespaces (what `ip netns pids` does, for all of them in one /proc pass)."""
    wanted: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(f"/run/netns/{name}")
        except OSError:
            continue
        wanted[(st.st_dev, st.st_ino)] = name
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone, or a zombie (which holds no namespace any more)
        owner = wanted.get((st.st_dev, st.st_ino))
        if owner is not None:
            found[int(entry)] = owner
    return found


def kill_namespace_processes(names: Sequence[str], stall_s: float = 10.0) -> list[int]:
    """SIGKILL every process in these namespaces until none is left. Waits as long as processes keep exiting
    (a thousand sshd take a while on two busy cores); gives up only after `stall_s` without any progress, and
    returns the survivors (the namespaces are deleted anyway: a process keeps a deleted namespace alive, but
    never its name)."""
    last_progress = time.monotonic()
    previous: set[int] | None = None
    while pids := namespace_pids(names):
        current = set(pids)
        if previous is None or len(current) < len(previous) or not current <= previous:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > stall_s:
            return sorted(current)
        previous = current
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    return []


def short_runtime_dir(run_id: str) -> Path:
    """Where a lab whose directory is too long for a Unix socket path keeps its push runs' ControlMaster
    sockets (a lab under pytest's tmp_path): named by the run id alone, so destroy_run removes it too."""
    return Path(f"/tmp/enc-{run_id}")


def destroy_run(run_id: str, root: Path | None = None) -> list[str]:
    """Remove one lab run: kill every process in its namespaces, delete them, delete its directory.

    Works from the names alone, so it also cleans a lab whose controller died. Returns the namespaces deleted.
    """
    if not RUN_ID_FORMAT.fullmatch(run_id):
        raise LabUnavailable(f"{run_id!r} is not a lab run id (letters and digits, as `enclave lab up` prints it)")
    names = run_namespaces(run_id)
    survivors = kill_namespace_processes(names)
    if names:
        _run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names), check=False,
             timeout=120 + len(names) * 0.1)
    left = [n for n in names if netns_exists(n)]
    shutil.rmtree((root or lab_root()) / run_id, ignore_errors=True)
    shutil.rmtree(short_runtime_dir(run_id), ignore_errors=True)
    if left or survivors:
        raise LabError(f"lab {run_id}: could not delete namespaces {left[:10]} ({len(left)})" if left else
                       f"lab {run_id}: namespaces deleted, but processes {survivors[:10]} survived SIGKILL")
    return names


@dataclass(frozen=True)
class LabRecord:
    """What `enclave lab down` needs to find a lab: its state file."""

    run_id: str
    stack: str
    directory: Path
    owner_pid: int
    kept: bool
    namespaces: list[str]
    ssh_config: str
    user: str | None = None  # who started it (`lab down --all` removes only the caller's labs)

    @property
    def owner_alive(self) -> bool:
        try:
            os.kill(self.owner_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def lab_records(root: Path | None = None) -> list[LabRecord]:
    out = []
    for path in sorted((root or lab_root()).glob(f"*/{STATE_FILE}")):
        try:
            data = json.loads(path.read_text())
            out.append(LabRecord(data["run_id"], data["stack"], path.parent, int(data["owner_pid"]),
                                 bool(data["kept"]), list(data["namespaces"]), data["ssh_config"], data.get("user")))
        except (OSError, ValueError, KeyError):
            continue
    return out


# --------------------------------------------------------------------------------------------- lab


def mac(index: int, bridge: str) -> str:
    """A lab interface's MAC address: fixed, so every namespace can be given its neighbours' in advance."""
    return f"02:00:{1 if bridge == 'public' else 2:02x}:{index >> 16 & 255:02x}:{index >> 8 & 255:02x}:{index & 255:02x}"


def _block_signals() -> set[int | signal.Signals]:
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Lab:
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
      e.g. a test's emulation of a stock image's /usr/sbin (tests/stock_image).
    starve_neighbours: a failure injected into the harness, for tests: these namespaces get no static
      neighbour entries and cannot resolve any neighbour, as when the kernel's shared neighbour table is full.
    """

    def __init__(
        self,
        stack: Stack,
        *,
        files_override: Mapping[str, RuleFiles] | None = None,
        host_env: Mapping[str, str] | None = None,
        run_id: str | None = None,
        root: Path | None = None,
        progress: LabProgress | None = None,
        exhaustive: bool | None = None,
        starve_neighbours: Sequence[str] = (),
        host_wrapper: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.stack = stack
        self.plan = build_plan(stack)
        self.policy = self.plan.policy
        self.addresses = self.plan.addresses
        unknown = sorted(set(files_override or {}) - set(self.plan.files))
        if unknown:
            raise ValueError(f"files_override names unknown hosts {unknown}; hosts are {', '.join(self.plan.files)}")
        self.files: dict[str, RuleFiles] = {**self.plan.files, **(files_override or {})}
        self.others = outsiders(stack.config, self.addresses)
        self.run_id = run_id or secrets.token_hex(3)
        if not RUN_ID_FORMAT.fullmatch(self.run_id):
            raise ValueError(f"run_id {self.run_id!r}: letters and digits only")
        self.dir = (root or lab_root()) / self.run_id
        self.host_env = dict(host_env or {})
        self.interfaces = stack.config.interfaces
        self.ports, _ = probe_ports(self.policy)
        self.timings: dict[str, float] = {}
        self.push_failures: dict[str, PushFailed] = {}
        self.progress = progress or LabProgress()
        self.kept = False
        self._agent: subprocess.Popen[bytes] | None = None
        self._previous_handlers: dict[int, Any] = {}
        if exhaustive is None:
            exhaustive = exhaustive_probe_count(self.policy, self.addresses, self.others) <= EXHAUSTIVE_MAX_PROBES
        self.sample: list[str] | None = None if exhaustive else sample_hosts(self.policy)
        self.probe_set: ProbeSet = plan_probes(self.policy, self.addresses, self.others, self.sample)
        unknown = sorted(set(starve_neighbours) - {*self.policy.host_by_name, *OUTSIDERS})
        if unknown:
            raise ValueError(f"starve_neighbours names unknown hosts {unknown}")
        self.starved = set(starve_neighbours)
        unknown = sorted(set(host_wrapper or {}) - set(self.policy.host_by_name))
        if unknown:
            raise ValueError(f"host_wrapper names unknown hosts {unknown}")
        self.host_wrapper = {h: list(argv) for h, argv in (host_wrapper or {}).items()}
        self.install_failures: dict[str, str] = {}  # host -> what its first-boot install said, where it failed
        self._expected: dict[str, str] = {}  # host -> its normalized firewall as the compiler says it must be

    # ------------------------------------------------------------------------------------ names

    @property
    def hosts(self) -> list[Host]:
        return list(self.policy.hosts)

    def namespace(self, name: str) -> str:
        """The namespace of a host (`mysql-1`), an outsider (`internet`, `operator`, `neighbor`) or `fabric`."""
        return f"{NS_PREFIX}{self.run_id}-{name}"

    @property
    def namespaces(self) -> list[str]:
        """fabric, every host, the outsiders, and `scratch` (where the compiled files are loaded into a clean
        kernel to learn exactly what a host's kernel must show)."""
        return [self.namespace(n) for n in ["fabric", *(h.name for h in self.hosts), *OUTSIDERS, "scratch"]]

    def alias(self, host: str) -> str:
        """The host's name in the lab's ssh config (the same as in the Pulumi output `sshConfig`)."""
        return f"{self.stack.name}-{host}"

    def host_dir(self, host: str) -> Path:
        return self.dir / "hosts" / host

    def state_dir(self, host: str) -> Path:
        """The host's /var/lib/enclave."""
        return self.host_dir(host) / "state"

    @property
    def ssh_config_path(self) -> Path:
        return self.dir / "ssh_config"

    def agent_socket(self, name: str | None = None) -> Path:
        """The control socket of the probe agent serving `name`'s namespace: one agent serves them all."""
        return self.dir / "agents" / "agent.sock"  # Unix socket paths are short (108 bytes)

    def session_env(self, host: str) -> dict[str, str]:
        """What the host's sessions see: its own state directory, unit directory (no systemd here) and home
        (namespaces share this machine's filesystem; a droplet would not run this machine's ~/.bashrc)."""
        return {
            "HOME": str(self.host_dir(host) / "home"),
            "ENCLAVE_STATE_DIR": str(self.state_dir(host)),
            "ENCLAVE_SYSTEMD_DIR": str(self.host_dir(host) / "units"),
            # where the baseline writes sshd settings (a bastion's raised MaxStartups); the lab's sshd Includes it
            "ENCLAVE_SSHD_CONFIG_DIR": str(self.host_dir(host) / "sshd_config.d"),
            **self.host_env,
        }

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

    # ----------------------------------------------------------------------------------- network

    def _build_network(self) -> None:
        rid = self.run_id
        pub, priv = self.interfaces.public, self.interfaces.private
        try:
            _run(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in self.namespaces))
        except LabError as exc:
            raise LabUnavailable(
                f"{exc}; this machine does not let root create network namespaces (a container without "
                "CAP_SYS_ADMIN?): run the lab on a VM or a full host, or in a container started with --privileged"
            ) from None
        # Before any interface exists: no duplicate address detection (addresses usable at once); ping sockets
        # (ICMP echo without raw sockets) for every group, in the lab's namespaces only.
        # IPv6 only on the interfaces that have an IPv6 address (the public ones of `ipv6` roles and the
        # Internet's): every other one would send multicast listener reports, and each report costs an entry in
        # the kernel's neighbour table that every namespace on this machine shares.
        sysctls = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                   "net.ipv6.conf.default.disable_ipv6=1", "net.ipv4.ping_group_range=0 2147483647"]
        _run_all([(["ip", "netns", "exec", ns, "sysctl", "-qw", *sysctls], None) for ns in self.namespaces[1:]])
        with_ipv6 = [h.name for h in self.hosts if self.addresses[h.name].public6]
        with_ipv6 += [e.name for e in (self.others.internet, self.others.operator) if e.address6]

        fabric = [
            "link add public type bridge mcast_snooping 0",
            "link add private type bridge mcast_snooping 0",
            "link set public up",
            "link set private up",
        ]
        per_ns: dict[str, list[str]] = {}

        def plug(index: int, name: str, iface: str, bridge: str, addresses: list[str]) -> None:
            end = f"{rid}{index}{'u' if bridge == 'public' else 'v'}"  # <= 15 chars, run id for leak checks
            ns = self.namespace(name)
            fabric.append(f"link add {end} type veth peer name {iface} netns {ns}")
            fabric.append(f"link set {end} master {bridge} up")
            lines = per_ns.setdefault(ns, ["link set lo up"])
            lines.append(f"link set {iface} address {mac(index, bridge)}")
            for address in addresses:
                lines.append(f"address add {address} dev {iface}" + (" nodad" if ":" in address else ""))
            lines.append(f"link set {iface} up")
            if bridge == "public":  # on-link defaults: every public range shares one segment, no router
                lines += [f"route add default dev {iface}"] + (
                    [f"route add ::/0 dev {iface}"] if any(":" in a for a in addresses) else []
                )

        prefix = self.stack.config.vpc_ip_range.prefixlen
        for i, h in enumerate(self.hosts):
            a = self.addresses[h.name]
            plug(i, h.name, pub, "public", [f"{a.public}/32"] + ([f"{a.public6}/128"] if a.public6 else []))
            plug(i, h.name, priv, "private", [f"{a.private}/{prefix}"])
        n = len(self.hosts)
        for j, endpoint in enumerate((self.others.internet, self.others.operator)):
            addrs = ([f"{endpoint.address}/32"] if endpoint.address else []) + (
                [f"{endpoint.address6}/128"] if endpoint.address6 else []
            )
            plug(n + j, endpoint.name, pub, "public", addrs)
        plug(n + 2, "neighbor", priv, "private", [f"{self.others.neighbor.address}/{prefix}"])
        for name, entries in self.neighbour_entries().items():
            per_ns[self.namespace(name)] += [f"neigh replace {address} lladdr {lladdr} dev {iface} nud permanent"
                                             for iface, address, lladdr in sorted(entries)]

        _run(["ip", "-n", self.namespace("fabric"), "-batch", "-"], input="\n".join(fabric) + "\n",
             timeout=60 + len(fabric) * 0.05)
        _run_all([(self.in_ns(name, ["sysctl", "-qw", f"net.ipv6.conf.{pub}.disable_ipv6=0"]), None)
                  for name in with_ipv6])
        _run_all([(["ip", "-n", ns, "-batch", "-"], "\n".join(lines) + "\n") for ns, lines in per_ns.items()])
        if self.starved:  # the injected fault: these namespaces give up on every neighbour they do not know
            knobs = [f"net.ipv{v}.neigh.{iface}.{k}=0" for v in (4, 6) for iface in (pub, priv)
                     for k in ("mcast_solicit", "ucast_solicit", "app_solicit")]
            for name in sorted(self.starved):
                ifaces = {"internet": [pub], "operator": [pub], "neighbor": [priv]}.get(name, [pub, priv])
                _run(self.in_ns(name, ["sysctl", "-qew", *(k for k in knobs if k.split(".")[3] in ifaces)]))

    # ------------------------------------------------------------------------------ neighbours

    def link(self, name: str, kind: AddressKind) -> tuple[str, str, str] | None:
        """(interface, address, MAC) by which `name` (a host or an outsider) sends and receives on `kind`."""
        pub, priv = self.interfaces.public, self.interfaces.private
        names = [h.name for h in self.hosts]
        n = len(names)
        if name in self.addresses:
            a = self.addresses[name]
            index = self._index[name]
            address = {"private": a.private, "public": a.public, "public6": a.public6}[kind]
            iface, bridge = (priv, "private") if kind == "private" else (pub, "public")
        elif name == "neighbor":
            if kind != "private":
                return None
            index, address, iface, bridge = n + 2, self.others.neighbor.address, priv, "private"
        else:
            endpoint = self.others.internet if name == "internet" else self.others.operator
            if kind == "private":
                return None
            index, iface, bridge = (n if name == "internet" else n + 1), pub, "public"
            address = endpoint.address if kind == "public" else endpoint.address6
        return (iface, address, mac(index, bridge)) if address else None

    @property
    def _index(self) -> dict[str, int]:
        cached: dict[str, int] | None = getattr(self, "_index_cache", None)
        if cached is None:
            cached = {h.name: i for i, h in enumerate(self.hosts)}
            self._index_cache = cached
        return cached

    def neighbour_pairs(self) -> set[tuple[str, str, AddressKind]]:
        """(a, b, kind): a and b exchange packets over `kind`: every probe (both ways: the answer comes back),
        the operator with every host's public address and each bastion with every host's private one (the
        pushes, direct or through ProxyJump)."""
        pairs: set[tuple[str, str, AddressKind]] = {(p.source.name, p.target.host, p.target.kind)
                                                    for p in self.probe_set.probes}
        bastions = [h.name for h in self.policy.bastion_hosts()]
        for h in self.hosts:
            pairs.add(("operator", h.name, "public"))
            pairs.update((b, h.name, "private") for b in bastions if b != h.name)
        return pairs

    def neighbour_entries(self) -> dict[str, set[tuple[str, str, str]]]:
        """The permanent IPv4 neighbour entries each namespace gets: (interface, address, MAC).

        The kernel's neighbour table is shared by every namespace on the machine and holds gc_thresh3 (1 024)
        dynamic entries, a setting only the machine's own namespace has; a lab of H hosts would need about
        2·H·(H+3). Permanent entries do not count against it (the kernel exempts them from its garbage
        collector's limit), so the lab writes what each namespace needs inside that namespace and never relies
        on the shared table. IPv6 keeps neighbour discovery: proving that the rules let it through is part
        of the lab's job (and the IPv6 addresses are few).
        """
        entries: dict[str, set[tuple[str, str, str]]] = {}
        for a, b, kind in self.neighbour_pairs():
            if kind == "public6":
                continue
            la, lb = self.link(a, kind), self.link(b, kind)
            if la is None or lb is None:
                continue
            if a not in self.starved:
                entries.setdefault(a, set()).add((la[0], lb[1], lb[2]))
            if b not in self.starved:
                entries.setdefault(b, set()).add((lb[0], la[1], la[2]))
        return entries

    # ---------------------------------------------------------------------------------- hosts

    def in_ns(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        """argv run inside a lab namespace (with `env` set, e.g. a host's session environment)."""
        prefix = ["ip", "netns", "exec", self.namespace(name), *self.host_wrapper.get(name, ())]
        if env:
            prefix += ["env", *(f"{k}={v}" for k, v in env.items())]
        return prefix + list(argv)

    def run(self, name: str, argv: Sequence[str], *, input: str | None = None, check: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command in a host's or outsider's namespace, like on its console (a host gets its state dir)."""
        env = self.session_env(name) if name in self.policy.host_by_name else None
        return _run(self.in_ns(name, argv, env), input=input, check=check, timeout=timeout)

    def console(self, host: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`sh -s` on the host's console (no SSH, no firewall in the way), e.g. to push a mutated rule file."""
        return self.run(host, ["sh", "-s"], input=script, check=check)

    def _boot_script(self, host: Host) -> str:
        """What cloud-init's bootcmd runs on every boot: the role's baseline, or the last confirmed rules."""
        return baseline_script(baseline_files(self.stack.config, host.role),
                               bastion=self.stack.config.roles[host.role].bastion)

    def _make_keys(self) -> None:
        """The stack's key pair (the secret `sshPrivateKey`, handed to each push run in its environment), each
        host's host key, each host's authorized_keys (what DigitalOcean installs from the stack's SshKey, in
        the host's home), the known_hosts a first push leaves (accept-new), and the config `enclave ssh-config`
        prints, for ssh()."""
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        jobs: list[tuple[Sequence[str], str | None]] = [([*keygen, "-C", "enclave-lab", "-f", str(self.dir / "id_ed25519")], None)]
        for h in self.hosts:
            (self.host_dir(h.name) / "home" / ".ssh").mkdir(parents=True, mode=0o700)
            (self.host_dir(h.name) / "sshd_config.d").mkdir(mode=0o755)
            jobs.append(([*keygen, "-C", h.name, "-f", str(self.host_dir(h.name) / "ssh_host_ed25519_key")], None))
        _run_all(jobs)
        self.private_key = (self.dir / "id_ed25519").read_text()
        self.public_key = (self.dir / "id_ed25519.pub").read_text().strip()
        self.previous_private_key: str | None = None  # set while a test rotates the key
        self.push_stdout: dict[str, str] = {}  # per host, the last confirmed run's stdout (Pulumi's state)
        known = []
        for h in self.hosts:
            (self.host_dir(h.name) / "home" / ".ssh" / "authorized_keys").write_text(self.public_key + "\n")
            a = self.addresses[h.name]
            names = ",".join(x for x in (a.public, a.private, a.public6) if x)
            key = (self.host_dir(h.name) / "ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"{names} {key[0]} {key[1]}\n")
        (self.dir / "known_hosts").write_text("".join(known))
        options = (
            f"UserKnownHostsFile {self.dir / 'known_hosts'}",
            "GlobalKnownHostsFile /dev/null",
            "StrictHostKeyChecking yes",
            "BatchMode yes",
            "ConnectTimeout 3",
            "LogLevel ERROR",
        )
        text = ssh_config(self.stack.name, self.policy, self.addresses, SSH_USER, str(self.dir / "id_ed25519"), options)
        self.ssh_config_path.write_text(text)

    def _sshd_config(self, host: str) -> str:
        """sshd at a droplet's defaults (MaxStartups 10:30:100, MaxSessions 10), plus what the baseline writes
        into ENCLAVE_SSHD_CONFIG_DIR (a bastion's raised MaxStartups), Included first as Debian's sshd_config
        Includes sshd_config.d: sshd keeps the first value it reads."""
        d = self.host_dir(host)
        env = " ".join(f"{k}={v}" for k, v in self.session_env(host).items())
        return f"""# enclave lab {self.run_id}: sshd of {host} (stack {self.stack.name})
Include {d / 'sshd_config.d'}/*.conf
Port 22
ListenAddress 0.0.0.0
ListenAddress ::
HostKey {d / 'ssh_host_ed25519_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'home' / '.ssh' / 'authorized_keys'}
# The lab's files live in a temporary directory; PAM would consult this machine's login policy.
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
UseDNS no
LogLevel VERBOSE
# Namespaces share one filesystem: each host keeps its enclave state in its own directory.
SetEnv {env}
"""

    def _write_sshd_config(self, host: str) -> Path:
        path = self.host_dir(host) / "sshd_config"
        path.write_text(self._sshd_config(host))
        return path

    @staticmethod
    def _sshd() -> str:
        sshd = tool("sshd")
        assert sshd is not None
        return sshd

    def _start_sshd(self, host: str) -> None:
        # sshd daemonizes; its pid file appears once it listens.
        d = self.host_dir(host)
        _run(self.in_ns(host, [self._sshd(), "-f", str(self._write_sshd_config(host)), "-E", str(d / "sshd.log")]))

    def _start_agent(self) -> None:
        """The one probe agent, in the fabric namespace (so the teardown finds it): it enters every probed host's
        namespace to listen on every probe port there, and each source's namespace to send its probes. Only the
        probed hosts (all, or the sample): the others' rules are proven from their kernel, not with packets."""
        spec = []
        for name in [*(h.name for h in self.probe_set.hosts), *OUTSIDERS]:
            is_host = name in self.policy.host_by_name
            spec.append({
                "name": name,
                "netns": f"/run/netns/{self.namespace(name)}",
                # outsiders only send; port 22 is sshd's
                "tcp": listen_ports(self.ports, "tcp", skip=(22,)) if is_host else [],
                "udp": listen_ports(self.ports, "udp") if is_host else [],
            })
        spec_path = self.dir / "agents" / "namespaces.json"
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, "-m", "enclave.lab.agent", "--control", str(self.agent_socket()),
                "--namespaces", str(spec_path)]
        log = open(self.dir / "agents" / "agent.log", "wb")
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        self._agent = subprocess.Popen(
            self.in_ns("fabric", argv), stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
            cwd=PROJECT_ROOT, env=env, start_new_session=True,
        )
        log.close()

    def _wait_until_ready(self, names: Sequence[str], timeout: float | None = None) -> None:
        """Until the probe agent said "ready" (when it is starting) and the sshd of every host among `names`
        wrote its pid file. The deadline grows with the lab: a thousand hosts boot on two cores for minutes."""
        end = time.monotonic() + (timeout if timeout is not None else 30 + 0.2 * len(names))
        proc = self._agent
        if proc is not None and proc.stdout is not None and not proc.stdout.closed:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
            line = proc.stdout.readline() if ready else b""
            proc.stdout.close()
            if line.strip() != b"ready":
                log = (self.dir / "agents" / "agent.log").read_text(errors="replace").strip()[-1500:]
                raise HarnessError(f"the probe agent did not start: {log or 'no output'}")
        for host in (n for n in names if n in self.policy.host_by_name):
            pid_file = self.host_dir(host) / "sshd.pid"
            while not pid_file.exists():
                if time.monotonic() > end:
                    log = (self.host_dir(host) / "sshd.log").read_text(errors="replace").strip()[-1500:]
                    raise LabError(f"sshd in {self.namespace(host)} did not start: {log or 'no output'}")
                time.sleep(0.01)
            self.progress.advance("boot", detail=f"{host} up")

    def reboot(self, host: str, *, boot_env: Mapping[str, str] | None = None) -> None:
        """A reboot: processes and kernel state (rules, sets) gone, the disk (state dir) kept; then the host
        boots as a droplet does: cloud-init's bootcmd (baseline, or the last confirmed rules), then sshd. (The
        probe agent lives in the fabric namespace: its listeners there survive, as a droplet's services restart.)

        boot_env: extra environment for the boot script only (e.g. the fault-injection tests' kill point)."""
        ns = self.namespace(host)
        kill_namespace_processes([ns])
        self.console(host, WIPE_KERNEL_STATE)
        (self.host_dir(host) / "sshd.pid").unlink(missing_ok=True)
        boot = [f"{k}={v}" for k, v in (boot_env or {}).items()]
        self.run(host, ["env", *boot, "sh", "-s"], input=self._boot_script(self.policy.host_by_name[host]), check=not boot)
        self._start_sshd(host)
        self._wait_until_ready([host])

    # ------------------------------------------------------------------------------------------ ssh

    def ssh(self, host: str, command: str = "sh -s", *, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A NEW OpenSSH connection from the operator namespace to `host` (through the bastion if it is not
        one), running `command`, from the config `enclave ssh-config` prints: what an operator types to look at
        a host. Never raises on a non-zero exit: callers look at the result. (Pushes go through push().)"""
        argv = self.in_ns("operator", ["ssh", "-F", str(self.ssh_config_path), self.alias(host), command])
        return _run(argv, input=input, check=False, timeout=timeout)

    def firewall_state(self, host: str) -> str:
        """What an operator compares before and after a change, read on the host's console: iptables-save,
        ip6tables-save and `ipset save`, normalized (normalized_firewall)."""
        tables = self.console(host, "iptables-save; ip6tables-save").stdout
        return normalized_firewall(tables, self.console(host, "ipset save").stdout)

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
        kill_after: cancel the run once that many pushes finished: SIGKILL every running push and its ssh
        (a Ctrl-C'd or killed `pulumi up`), start nothing more.

        Returns the hosts that did not confirm (step `not started` for those never run).
        """
        started = time.monotonic()
        parallel = parallel or 4 * (os.cpu_count() or 1)
        bastions = [h.name for h in self.policy.bastion_hosts()]
        others = [h.name for h in self.hosts if h.name not in bastions]
        failures: dict[str, PushFailed] = {}
        self.progress.begin("push", len(self.hosts), f"{parallel} at once, bastions first ({', '.join(bastions) or 'none'})")
        queue = list(bastions) or list(others)
        waiting = others if bastions else []
        running: dict[str, subprocess.Popen[str]] = {}
        finished: queue_module.Queue[tuple[str, str, str]] = queue_module.Queue()
        done = 0
        stopped = False

        def wait(host: str, proc: subprocess.Popen[str], stdin: str) -> None:
            stdout, stderr = proc.communicate(stdin)
            finished.put((host, stdout, stderr))

        while queue or running or waiting:
            while queue and len(running) < parallel and not stopped:
                host = queue.pop(0)
                running[host], stdin = self._start_push(host, None, redial_s, None)
                threading.Thread(target=wait, args=(host, running[host], stdin), daemon=True).start()
            if not running:
                break
            host, stdout, stderr = finished.get()
            proc = running.pop(host)
            done += 1
            try:
                self._finish_push(host, proc, stdout, stderr)
            except PushFailed as failure:
                failures[host] = failure
                self.progress.advance("push", detail=f"{host}: {failure.step} FAILED")
                stopped = stopped or not continue_on_error
            else:
                self.progress.advance("push", detail=f"{host} confirmed")
            if kill_after is not None and done >= kill_after and not stopped:
                stopped = True
                for proc in running.values():
                    os.killpg(proc.pid, signal.SIGKILL)  # ip netns exec execs python: the group is the run's
            if not queue and not running and waiting:  # the bastions are done: their dependents become ready
                failed = [b for b in bastions if b in failures]
                if failed:
                    for host in waiting:
                        failures[host] = PushFailed(host, "not started", subprocess.CompletedProcess(
                            [], 0, "", f"bastion push {', '.join(failed)} failed; the engine runs no dependent"))
                    waiting = []
                queue, waiting = waiting, []
        for host in queue + waiting:
            failures[host] = PushFailed(host, "not started", subprocess.CompletedProcess([], 0, "", "the run was cancelled"))
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

    # ----------------------------------------------------------------------------------- proofs

    def expected_firewalls(self) -> dict[str, str]:
        """Per host, the normalized firewall (normalized_firewall) the compiler's files must produce.

        Hosts whose files differ only in comments share one; each distinct one is learned once by loading the
        compiled files into a clean kernel (the `scratch` namespace) exactly as a droplet gets them: the role's
        boot baseline, then the push and its confirmation. The rule text is the compiler's; the kernel only
        spells it the way iptables-save and ipset save read it back.
        """
        if self._expected:
            return self._expected
        groups: dict[tuple[str, ...], list[str]] = {}
        for h in self.hosts:
            f = self.plan.files[h.name]
            key = (h.role, *(_without_comments(t) for t in (f.ipv4, f.ipv6, f.ipsets)), *f.set_names)
            groups.setdefault(key, []).append(h.name)
        for n, (key, hosts) in enumerate(groups.items()):
            files = self.plan.files[hosts[0]]
            d = self.dir / "scratch" / str(n)
            env = {"HOME": str(d), "ENCLAVE_STATE_DIR": str(d / "state"), "ENCLAVE_SYSTEMD_DIR": str(d / "units"),
                   "ENCLAVE_ROLLBACK_SECONDS": "3600"}
            baseline = baseline_files(self.stack.config, key[0])
            steps = {"wipe": WIPE_KERNEL_STATE, "boot": baseline_script(baseline),
                     "push": push_script(files, self.stack.name, baseline=baseline),
                     "confirm": confirm_script(files, self.stack.name)}
            d.mkdir(parents=True)
            for name, text in steps.items():
                (d / f"{name}.sh").write_text(text)
            # each step as its own `sh` (as each arrives on the host), all in one trip into the namespace
            run_all = " && ".join(f'sh "{d / name}.sh"' for name in steps)
            out = _run(self.in_ns("scratch", ["sh", "-c", f'{{ {run_all}; }} >&2 && iptables-save && ip6tables-save && '
                                                          'echo "#=sets" && ipset save'], env)).stdout
            tables, _, sets = out.partition("#=sets\n")
            for host in hosts:
                self._expected[host] = normalized_firewall(tables, sets)
        return self._expected

    def live_firewall(self, host: str) -> tuple[str, str]:
        """The host's normalized firewall read from its kernel, and the digest of its confirmed rules."""
        out = self.console(host, 'iptables-save; ip6tables-save; echo "#=sets"; ipset save; echo "#=digest"; '
                                 'cat "$ENCLAVE_STATE_DIR/confirmed/digest" 2>/dev/null; true').stdout
        tables, _, rest = out.partition("#=sets\n")
        sets, _, confirmed = rest.partition("#=digest\n")
        return normalized_firewall(tables, sets), confirmed.strip()

    def prove_hosts(self) -> list[HostProof]:
        """EVERY host, whatever the probes sample: its live rules and sets (iptables-save, ip6tables-save,
        ipset save) equal the compiler's, and its confirmed digest is the compiled files' digest."""
        expected = self.expected_firewalls()

        def prove(host: str) -> HostProof:
            live, confirmed = self.live_firewall(host)
            want = digest(self.plan.files[host])
            problems = []
            if confirmed != want:
                problems.append(f"confirmed digest {confirmed or 'missing'}, compiled {want}")
            if live != expected[host]:
                diff = list(difflib.unified_diff(expected[host].splitlines(), live.splitlines(), "compiled", "live",
                                                 n=0, lineterm=""))[2:]
                changed = [line for line in diff if not line.startswith("@@")]
                problems.append(f"{len(changed)} line(s) differ from the compiled rules: " + "; ".join(changed[:6]))
            return HostProof(host, not problems, "; ".join(problems) or f"rules, sets and digest {want} as compiled")

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(prove, [h.name for h in self.hosts]))

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
