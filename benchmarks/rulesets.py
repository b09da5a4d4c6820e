"""The rulesets the data-plane and apply benchmarks load into a server namespace.

- enclave: the files `Renderer` makes for `server-1` of `fleet.peers_stack(N)`, installed by the real push;
- the references: no firewall, the floor (default drop, conntrack, one accept rule) and the seed tutorial's
  form (one `-s <peer> -j ACCEPT` rule per peer, the measuring client last).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass

from enclave.compiler import Addresses, compile_policy
from enclave.plan import example_addresses
from enclave.push import confirm_script, push_script
from enclave.render import Renderer, RuleFiles

from .fleet import MAX_PER_ROLE, peers_stack
from .netns import BenchError, Pair, run

PORT = 8080  # TCP (the HTTP server) and UDP (the packet sink)
EMPTY_TABLE = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


@dataclass(frozen=True)
class PeerFleet:
    peers: int
    files: RuleFiles  # server-1's rule files
    peer_ips: tuple[str, ...]  # in set order; the client's address last


def enclave_files(
    peers: int, client_ip: str, server_ip: str, server_if: str, per_role: int = MAX_PER_ROLE
) -> PeerFleet:
    """server-1's files for a stack admitting `peers` peers; the last peer has the client's address."""
    stack = peers_stack(peers, PORT, private_interface=server_if, per_role=per_role)
    policy = compile_policy(stack)
    addresses = example_addresses(policy)
    peer_hosts = [h for h in policy.hosts if h.role.startswith("peer-")]
    last = peer_hosts[-1].name
    addresses[last] = Addresses(addresses[last].public, client_ip)
    addresses["server-1"] = Addresses(addresses["server-1"].public, server_ip)
    files = Renderer(policy, addresses, "bench").render(policy.host_by_name["server-1"])
    return PeerFleet(peers, files, tuple(addresses[h.name].private for h in peer_hosts))


def floor_table(client_ip: str, server_if: str) -> str:
    return "\n".join([
        "*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A INPUT -i {server_if} -s {client_ip}/32 -j ACCEPT",
        "COMMIT", "",
    ])


def seed_rules(peer_ips: tuple[str, ...]) -> list[str]:
    """The seed tutorial's whitelist: one rule per peer, in peer order (the client is the last peer)."""
    return [f"-A INPUT -s {ip}/32 -j ACCEPT" for ip in peer_ips]


def seed_table(peer_ips: tuple[str, ...]) -> str:
    return "\n".join([
        "*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        *seed_rules(peer_ips),
        "COMMIT", "",
    ])


def reset(pair: Pair) -> None:
    """Back to no firewall at all: empty filter tables, no sets, no enclave state."""
    pair.in_server("iptables-restore", "-w", input=EMPTY_TABLE)
    pair.in_server("ip6tables-restore", "-w", input=EMPTY_TABLE)
    # The kernel lets go of a set a flushed rule used only after a grace period: retry until all are gone.
    for _ in range(50):
        pair.in_server("ipset", "flush", check=False)  # empties list:sets, which hold other sets
        pair.in_server("ipset", "destroy", check=False)
        if not pair.in_server("ipset", "list", "-n").strip():
            return
        time.sleep(0.02)
    raise BenchError("ipset sets in the server namespace would not go away after the rules were flushed")


# Stands in for `sh` on the push's PATH when apply.sh is timed: each run of enclave's apply.sh that the push
# starts (`sh …/apply.sh ARGS`) is timed with bash's clock (no fork) and logged; everything else, and apply.sh
# itself, runs with the real /bin/sh unchanged. So apply.sh is timed exactly as the push runs it, whatever
# the push script and apply.sh of the day say.
SH_TIMER = r"""#!/bin/bash
if [[ "${1:-}" == */apply.sh ]]; then
  start=$EPOCHREALTIME
  /bin/sh "$@"; rc=$?
  echo "$start $EPOCHREALTIME ${*:2}" >> "$ENCLAVE_BENCH_APPLY_LOG"
  exit $rc
fi
exec /bin/sh "$@"
"""


@dataclass(frozen=True)
class ApplyRun:
    seconds: float
    args: str  # apply.sh's arguments, the state directory written as $STATE


class Pusher:
    """Runs enclave's push (and confirm) in the server namespace, with state and unit files in a temp dir.

    time_apply: put SH_TIMER first on the push's PATH, so `apply_runs` tells how long each apply.sh the last
    push ran took (a separate pusher measures the push itself, which the stand-in would slow down).
    """

    def __init__(self, pair: Pair, *, time_apply: bool = False) -> None:
        self.pair = pair
        self._dir = tempfile.TemporaryDirectory(prefix="enclave-bench-")
        self.env = [
            "env",
            f"ENCLAVE_STATE_DIR={self._dir.name}/state",
            f"ENCLAVE_SYSTEMD_DIR={self._dir.name}/systemd",  # never the machine's own systemd
            "ENCLAVE_ROLLBACK_SECONDS=20",
        ]
        self._apply_log = f"{self._dir.name}/apply-runs"
        if time_apply:
            bin_dir = f"{self._dir.name}/bin"
            os.mkdir(bin_dir)
            with open(f"{bin_dir}/sh", "w") as f:
                f.write(SH_TIMER)
            os.chmod(f"{bin_dir}/sh", 0o755)
            self.env += [f"PATH={bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", f"ENCLAVE_BENCH_APPLY_LOG={self._apply_log}"]

    @property
    def state_dir(self) -> str:
        return f"{self._dir.name}/state"

    def forget(self) -> None:
        """Drop the host's enclave state, as on a host that was never pushed to."""
        self.pair.in_server("rm", "-rf", self.state_dir)

    def push(self, files: RuleFiles) -> float:
        """Seconds for the whole push script (write files, validate, arm rollback, apply); then confirm."""
        script = push_script(files, "bench")
        if os.path.exists(self._apply_log):
            os.remove(self._apply_log)
        start = time.perf_counter()
        self.pair.in_server(*self.env, "/bin/sh", "-s", input=script)
        elapsed = time.perf_counter() - start
        self.pair.in_server(*self.env, "/bin/sh", "-s", input=confirm_script(files, "bench"))
        self._end_timers()
        return elapsed

    def apply_runs(self) -> list[ApplyRun]:
        """The apply.sh runs of the last push (time_apply only), in order."""
        try:
            with open(self._apply_log) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        runs = []
        for line in lines:
            start, end, *args = line.split()
            runs.append(ApplyRun(float(end) - float(start), " ".join(args).replace(self.state_dir, "$STATE")))
        return runs

    def _end_timers(self) -> None:
        """End the push's rollback timer once confirmed (it would only wake to find nothing to do): the
        benchmarks push hundreds of times, and no sleeper should outlive its measurement."""
        for pid in run(["ip", "netns", "pids", self.pair.server]).split():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"enclave-rollback" in f.read():
                        os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self._dir.cleanup()
