"""The lab's state and names: what every part of the lab (topology, hosts, proofs, pushes) shares."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from config.stackfile import Stack

from ..compiler import Host
from ..kernelstate import KernelState
from ..plan import build_plan, outsiders
from .nat import NatAddresses, nat_addresses
from ..render import RuleFiles
from .machine import NS_PREFIX, RUN_ID_FORMAT, _run, lab_root
from .probe import ProbeSet, exhaustive_probe_count, plan_probes, probe_ports, sample_hosts
from .progress import LabProgress
from .scheduler import PushFailed

OUTSIDERS = ("internet", "operator", "neighbor")
NAT = "nat"  # the namespace standing for the VPC's NAT gateway (only when the stack has one)
# Exhaustive (every source to every host) while it costs at most this many probes: about 20 prod-shaped hosts,
# a few seconds. Beyond it the lab samples (first and last host of each role) and proves every host's rules
# from its kernel, which is as strong (see docs/lab.md) and linear in hosts instead of quadratic.
EXHAUSTIVE_MAX_PROBES = 20_000


class LabBase:
    """One stack's lab before anything is built: the plan, the options (see Lab), and every name the lab's
    parts share (namespaces, directories, a host's session environment, running a command in a namespace)."""

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
        self.nat: NatAddresses | None = nat_addresses(stack.config, self.addresses, self.others)
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
        self._expected: dict[str, KernelState] = {}  # host -> its canonical firewall as the compiler says it must be
        # the stack's key pair (made by up(); the private key is the secret `sshPrivateKey` a push run gets)
        self.private_key = ""
        self.public_key = ""
        self.previous_private_key: str | None = None  # set while a test rotates the key
        self.push_stdout: dict[str, str] = {}  # per host, the last confirmed run's stdout (Pulumi's state)

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
        nat = [NAT] if self.nat else []
        return [self.namespace(n) for n in ["fabric", *(h.name for h in self.hosts), *OUTSIDERS, *nat, "scratch"]]

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
