"""The lab: a stack's network built out of Linux network namespaces on this machine, pushed and probed for real.

Topology (nothing is added to the machine's own namespace; every name carries the run id):

    enc-<run>-fabric       two bridges: `public` (the Internet) and `private` (the VPC)
    enc-<run>-<host>       one per stack host: the public and private interfaces named as in
                           `enclave:interfaces`, veth'd into the fabric's bridges, with the plan's example
                           addresses (enclave.plan.example_addresses), a real sshd and a probe agent
    enc-<run>-internet     on the public segment, outside `operators`
    enc-<run>-operator     on the public segment, inside `operators`: where `pulumi up` would run
    enc-<run>-neighbor     on the private segment: another tenant of the shared private network

Every public address is a /32 (or /128) with an on-link default route, so the plan's public ranges share one
L2 segment without a router. Veth pairs are created from inside the fabric namespace with the host end
placed straight into its namespace.

Each host boots like a droplet: the role's first-boot baseline (the cloud-init bootcmd text), then sshd. The
push is the Pulumi program's: from the operator namespace, the real OpenSSH client runs `sh -s` with the push
script on stdin (bastions on their public address, every other host through the bastion with ProxyJump),
then the confirmation over a new connection. Namespaces share the filesystem, so each host's sshd gives its
sessions their own ENCLAVE_STATE_DIR (sshd_config SetEnv); the scripts are byte for byte the program's.

`Lab` is a context manager: everything is removed on exit, on failure, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
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
from ..push import baseline_script, confirm_script, push_script
from ..render import RuleFiles, baseline_files
from ..sshconfig import ssh_config
from .probe import LabReport, plan_probes, probe_ports, send_probes, listen_ports, tests_with_packets
from .progress import LabProgress

NS_PREFIX = "enc-"
LAB_DIR_ENV = "ENCLAVE_LAB_DIR"
LAB_DIR_DEFAULT = Path("/run/enclave-lab")
# A run id names namespaces (enc-<run>-<host>) and a directory under the lab root that `lab down` deletes: letters
# and digits only, so `enclave lab down ..` (or `/`) can never point the deletion outside the lab root.
RUN_ID_FORMAT = re.compile(r"[0-9A-Za-z]{1,32}")
STATE_FILE = "lab.json"
OUTSIDERS = ("internet", "operator", "neighbor")
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
    def __init__(self, host: str, step: str, result: subprocess.CompletedProcess[str]) -> None:
        self.host, self.step, self.result = host, step, result
        output = (result.stderr.strip() or result.stdout.strip() or "no output")[-2000:]
        hint = ""
        if step == "confirm" and result.returncode == 255:  # ssh itself failed, not the confirm script
            hint = (" (the push applied, then a new SSH connection could not get in: do the new rules still admit"
                    " SSH from the bastion? Unconfirmed, the host rolls back by itself)")
        elif step == "push" and result.returncode == 255:
            hint = f" (SSH could not reach {host}: is it up, its sshd running, and does it admit SSH from the bastion?)"
        super().__init__(f"{step} to {host} failed (exit {result.returncode}): {output}{hint}")


def normalized_firewall(tables: str, sets: str) -> str:
    """iptables-save/ip6tables-save and `ipset save` output as an operator compares them before and after:
    without comment lines (timestamps) and counters, ipset's random `initval` stripped, set lines sorted
    (a hash set has no member order)."""
    rules = [re.sub(r" \[\d+:\d+\]$", "", line) for line in tables.splitlines() if not line.startswith("#")]
    members = sorted(re.sub(r" initval 0x[0-9a-f]+", "", line) for line in sets.splitlines() if line.strip())
    return "\n".join(rules + members) + "\n"


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


def _run_all(commands: Sequence[tuple[Sequence[str], str | None]], timeout: float = 60) -> None:
    """Several commands at once (each with optional stdin); raise on the first that failed."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_run, argv, input=stdin, timeout=timeout) for argv, stdin in commands]
        for future in futures:
            future.result()


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


def kill_namespace_processes(names: Sequence[str], deadline_s: float = 5.0) -> None:
    end = time.monotonic() + deadline_s
    while pids := namespace_pids(names):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > end:
            raise LabError(f"processes {sorted(pids)} in {sorted(set(pids.values()))} survive SIGKILL")
        time.sleep(0.02)


def destroy_run(run_id: str, root: Path | None = None) -> list[str]:
    """Remove one lab run: kill every process in its namespaces, delete them, delete its directory.

    Works from the names alone, so it also cleans a lab whose controller died. Returns the namespaces deleted.
    """
    if not RUN_ID_FORMAT.fullmatch(run_id):
        raise LabUnavailable(f"{run_id!r} is not a lab run id (letters and digits, as `enclave lab up` prints it)")
    names = run_namespaces(run_id)
    kill_namespace_processes(names)
    if names:
        _run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names), check=False)
    left = [n for n in names if netns_exists(n)]
    if left:
        raise LabError(f"could not delete namespaces {left}; retry with `enclave lab down {run_id}`")
    shutil.rmtree((root or lab_root()) / run_id, ignore_errors=True)
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
                                 bool(data["kept"]), list(data["namespaces"]), data["ssh_config"]))
        except (OSError, ValueError, KeyError):
            continue
    return out


# --------------------------------------------------------------------------------------------- lab


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
        self._agents: dict[str, subprocess.Popen[bytes]] = {}
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------ names

    @property
    def hosts(self) -> list[Host]:
        return list(self.policy.hosts)

    def namespace(self, name: str) -> str:
        """The namespace of a host (`mysql-1`), an outsider (`internet`, `operator`, `neighbor`) or `fabric`."""
        return f"{NS_PREFIX}{self.run_id}-{name}"

    @property
    def namespaces(self) -> list[str]:
        return [self.namespace(n) for n in ["fabric", *(h.name for h in self.hosts), *OUTSIDERS]]

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

    def agent_socket(self, name: str) -> Path:
        index = ([h.name for h in self.hosts] + list(OUTSIDERS)).index(name)
        return self.dir / "agents" / f"{index}.sock"  # Unix socket paths are short (108 bytes)

    def session_env(self, host: str) -> dict[str, str]:
        """What the host's sessions see: its own state directory, unit directory (no systemd here) and home
        (namespaces share this machine's filesystem; a droplet would not run this machine's ~/.bashrc)."""
        return {
            "HOME": str(self.host_dir(host) / "home"),
            "ENCLAVE_STATE_DIR": str(self.state_dir(host)),
            "ENCLAVE_SYSTEMD_DIR": str(self.host_dir(host) / "units"),
            **self.host_env,
        }

    # --------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Lab:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._previous_handlers[sig] = signal.signal(sig, _sigterm_as_interrupt)
        try:
            self.up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if not self.kept:
                self.down()
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
        self.progress.begin("boot", len(names), "baseline, sshd and probe agent per host")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        _run_all([(self.in_ns(h.name, ["sh", "-s"], self.session_env(h.name)), self._boot_script(h)) for h in self.hosts])
        for h in self.hosts:
            self._start_sshd(h.name)
        for name in names:
            self._start_agent(name)
        self._wait_until_ready(names)
        self.timings["boot"] = time.monotonic() - started
        self.progress.end("boot", f"{len(self.hosts)} hosts on their baseline with sshd, {len(names)} probe agents ready")

    def down(self) -> None:
        """Remove everything of this run. Ctrl-C and SIGTERM wait until it is done."""
        started = time.monotonic()
        blocked = _block_signals()
        try:
            kill_namespace_processes(run_namespaces(self.run_id))
            for proc in self._agents.values():
                proc.wait()  # reap: the agents are our children
            self._agents.clear()
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
        # Before any interface exists: no duplicate address detection (addresses usable at once).
        dad = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        _run_all([(["ip", "netns", "exec", ns, "sysctl", "-qw", *dad], None) for ns in self.namespaces[1:]])

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

        _run(["ip", "-n", self.namespace("fabric"), "-batch", "-"], input="\n".join(fabric) + "\n")
        _run_all([(["ip", "-n", ns, "-batch", "-"], "\n".join(lines) + "\n") for ns, lines in per_ns.items()])

    # ---------------------------------------------------------------------------------- hosts

    def in_ns(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        """argv run inside a lab namespace (with `env` set, e.g. a host's session environment)."""
        prefix = ["ip", "netns", "exec", self.namespace(name)]
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
        return baseline_script(baseline_files(self.stack.config, host.role))

    def _make_keys(self) -> None:
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        jobs: list[tuple[Sequence[str], str | None]] = [([*keygen, "-C", "enclave-lab", "-f", str(self.dir / "id_ed25519")], None)]
        for h in self.hosts:
            (self.host_dir(h.name) / "home").mkdir(parents=True)
            jobs.append(([*keygen, "-C", h.name, "-f", str(self.host_dir(h.name) / "ssh_host_ed25519_key")], None))
        _run_all(jobs)
        (self.dir / "authorized_keys").write_text((self.dir / "id_ed25519.pub").read_text())
        known = []
        for h in self.hosts:
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
            # pulumi-command's Go SSH client negotiates curve25519; OpenSSH's default post-quantum kex costs
            # ~0.1 s of CPU per connection here, and the lab opens two connections per host (push, confirm).
            "KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",
        )
        text = ssh_config(self.stack.name, self.policy, self.addresses, SSH_USER, str(self.dir / "id_ed25519"), options)
        self.ssh_config_path.write_text(text)

    def _sshd_config(self, host: str) -> str:
        d = self.host_dir(host)
        env = " ".join(f"{k}={v}" for k, v in self.session_env(host).items())
        return f"""# enclave lab {self.run_id}: sshd of {host} (stack {self.stack.name})
Port 22
ListenAddress 0.0.0.0
ListenAddress ::
HostKey {d / 'ssh_host_ed25519_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {self.dir / 'authorized_keys'}
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
MaxStartups 1000
LogLevel VERBOSE
# Namespaces share one filesystem: each host keeps its enclave state in its own directory.
SetEnv {env}
"""

    def _start_sshd(self, host: str) -> None:
        d = self.host_dir(host)
        (d / "sshd_config").write_text(self._sshd_config(host))
        sshd = tool("sshd")
        assert sshd is not None
        # sshd daemonizes; its pid file appears once it listens.
        _run(self.in_ns(host, [sshd, "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")]))

    def _start_agent(self, name: str) -> None:
        is_host = name in self.policy.host_by_name
        argv = [
            sys.executable,
            "-m", "enclave.lab.agent",
            "--control", str(self.agent_socket(name)),
        ]
        if is_host:  # outsiders only send
            argv += ["--tcp", ",".join(map(str, listen_ports(self.ports, "tcp", skip=(22,))))]  # 22: sshd
            argv += ["--udp", ",".join(map(str, listen_ports(self.ports, "udp")))]
        log = open(self.dir / "agents" / f"{name}.log", "wb")
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        self._agents[name] = subprocess.Popen(
            self.in_ns(name, argv), stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
            cwd=PROJECT_ROOT, env=env, start_new_session=True,
        )
        log.close()

    def _wait_until_ready(self, names: Sequence[str], timeout: float = 30) -> None:
        """Until the agents of `names` said "ready" and the sshd of every host among them wrote its pid file."""
        end = time.monotonic() + timeout
        for name in names:
            proc = self._agents[name]
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
            line = proc.stdout.readline() if ready else b""
            proc.stdout.close()
            if line.strip() != b"ready":
                log = (self.dir / "agents" / f"{name}.log").read_text(errors="replace").strip()[-1500:]
                raise LabError(f"the probe agent in {self.namespace(name)} did not start: {log or 'no output'}")
            self.progress.advance("boot", detail=f"{name} ready")
        for host in (n for n in names if n in self.policy.host_by_name):
            pid_file = self.host_dir(host) / "sshd.pid"
            while not pid_file.exists():
                if time.monotonic() > end:
                    log = (self.host_dir(host) / "sshd.log").read_text(errors="replace").strip()[-1500:]
                    raise LabError(f"sshd in {self.namespace(host)} did not start: {log or 'no output'}")
                time.sleep(0.01)

    def reboot(self, host: str, *, boot_env: Mapping[str, str] | None = None) -> None:
        """A reboot: processes and kernel state (rules, sets) gone, the disk (state dir) kept; then the host
        boots as a droplet does: cloud-init's bootcmd (baseline, or the last confirmed rules), sshd, agent.

        boot_env: extra environment for the boot script only (e.g. the fault-injection tests' kill point)."""
        ns = self.namespace(host)
        kill_namespace_processes([ns])
        agent = self._agents.pop(host, None)
        if agent is not None:
            agent.wait()
        self.console(host, WIPE_KERNEL_STATE)
        (self.host_dir(host) / "sshd.pid").unlink(missing_ok=True)
        boot = [f"{k}={v}" for k, v in (boot_env or {}).items()]
        self.run(host, ["env", *boot, "sh", "-s"], input=self._boot_script(self.policy.host_by_name[host]), check=not boot)
        self._start_sshd(host)
        self._start_agent(host)
        self._wait_until_ready([host])

    # ------------------------------------------------------------------------------------------ ssh

    def ssh(self, host: str, command: str = "sh -s", *, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A NEW OpenSSH connection from the operator namespace to `host` (through the bastion if it is not
        one), running `command`. Never raises on a non-zero exit: callers look at the result."""
        argv = self.in_ns("operator", ["ssh", "-F", str(self.ssh_config_path), self.alias(host), command])
        return _run(argv, input=input, check=False, timeout=timeout)

    def firewall_state(self, host: str) -> str:
        """What an operator compares before and after a change, read on the host's console: iptables-save,
        ip6tables-save and `ipset save`, normalized (normalized_firewall)."""
        tables = self.console(host, "iptables-save; ip6tables-save").stdout
        return normalized_firewall(tables, self.console(host, "ipset save").stdout)

    def push(self, host: str, files: RuleFiles | None = None, *, redial_s: float = 0.0) -> str:
        """Install a host's rules as the Pulumi program does: the push script over SSH, then the
        confirmation over a new connection. Returns both outputs; raises PushFailed naming the step.

        redial_s: keep dialing the confirmation this long while SSH cannot get in, as pulumi-command does
        (30 dials of 20 s): after a push that cut SSH, the host rolls back and the late confirmation then
        reports it. 0 (`lab check`): one dial, so the probes see the rules that were pushed.
        """
        files = files or self.files[host]
        pushed = self.ssh(host, input=push_script(files, self.stack.name))
        if pushed.returncode != 0:
            raise PushFailed(host, "push", pushed)
        deadline = time.monotonic() + redial_s
        while True:
            confirmed = self.ssh(host, input=confirm_script(files, self.stack.name))
            if confirmed.returncode != 255 or time.monotonic() >= deadline:  # 255: ssh itself could not get in
                break
            time.sleep(0.2)
        if confirmed.returncode != 0:
            raise PushFailed(host, "confirm", confirmed)
        return pushed.stdout + confirmed.stdout

    def push_all(self) -> dict[str, PushFailed]:
        """Every host: bastions first (everyone else is reached through them), then the rest at once.

        A failed push does not stop the others (the probes then show what that host's rules do); the
        failures are returned, and the next probe() reports them.
        """
        started = time.monotonic()
        bastions = [h.name for h in self.policy.bastion_hosts()]
        others = [h.name for h in self.hosts if h.name not in bastions]
        failures: dict[str, PushFailed] = {}
        self.progress.begin("push", len(self.hosts), f"bastions first ({', '.join(bastions) or 'none'}), over SSH")

        def push(host: str) -> None:
            try:
                self.push(host)
            except PushFailed as failure:
                failures[host] = failure
                self.progress.advance("push", detail=f"{host}: {failure.step} FAILED")
            else:
                self.progress.advance("push", detail=f"{host} confirmed")

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for wave in (bastions, others):
                list(pool.map(push, wave))
        self.push_failures = failures
        self.timings["push"] = time.monotonic() - started
        summary = f"{len(self.hosts) - len(failures)} of {len(self.hosts)} hosts pushed and confirmed over SSH"
        if failures:
            summary += "; FAILED: " + ", ".join(f"{h} ({f.step})" for h, f in sorted(failures.items()))
        self.progress.end("push", summary)
        return failures

    # --------------------------------------------------------------------------------------- probe

    def probe(self) -> LabReport:
        """Every flow with real packets, compared with the compiled policy; and the stack's tests."""
        started = time.monotonic()
        probe_set = plan_probes(self.policy, self.addresses, self.others)
        agents = {name: str(self.agent_socket(name)) for name in [*(h.name for h in self.hosts), *OUTSIDERS]}
        self.progress.begin("probe", len(probe_set.probes), f"from {len(probe_set.sources)} sources at once")
        outcomes = send_probes(agents, probe_set.probes, lambda n: self.progress.advance("probe", n))
        tests = tests_with_packets(self.policy, self.addresses, self.others, outcomes)
        self.timings["probe"] = time.monotonic() - started
        passed = sum(o.passed for o in outcomes)
        wrong = sum(not o.matches for o in outcomes)
        self.progress.end(
            "probe",
            f"{len(outcomes)} probes: {passed} got through, {len(outcomes) - passed} dropped, "
            + (f"{wrong} disagree with the policy" if wrong else "all as the policy says"),
        )
        failures = [str(f) for f in self.push_failures.values()]
        return LabReport(
            self.stack.name, self.run_id, probe_set, outcomes, tests, self.plan.tests, failures, self.timings
        )

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
