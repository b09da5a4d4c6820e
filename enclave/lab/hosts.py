"""The lab's hosts as droplets: keys, first boot (the role's baseline), sshd at a droplet's defaults, the probe
agent, readiness, and reboots."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..compiler import Host
from ..push import baseline_script
from ..render import baseline_files
from ..sshconfig import ssh_config
from .base import OUTSIDERS, LabBase
from .cleanup import kill_namespace_processes
from .machine import PROJECT_ROOT, SSH_USER, LabError, _run, _run_all, tool
from .probe import HarnessError, listen_ports

# What a reboot loses: every rule and set (the filter table is the one enclave and the tutorial use).
WIPE_KERNEL_STATE = """for t in iptables ip6tables; do
  for c in INPUT FORWARD OUTPUT; do $t -w -P $c ACCEPT; done
  $t -w -F && $t -w -X
done
ipset destroy
"""



class Hosts(LabBase):
    """Booting, running and rebooting the lab's hosts."""

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
        self.previous_private_key = None
        self.push_stdout = {}
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
            answers = is_host or name == "internet"  # the Internet answers the hosts' egress probes
            spec.append({
                "name": name,
                "netns": f"/run/netns/{self.namespace(name)}",
                # the operator and the neighbour only send; on hosts port 22 is sshd's
                "tcp": listen_ports(self.ports, "tcp", skip=(22,) if is_host else ()) if answers else [],
                "udp": listen_ports(self.ports, "udp") if answers else [],
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
