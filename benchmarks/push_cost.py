"""A fleet's pushes in the lab, as `pulumi up` runs them: N hosts at the engine's parallelism, FIFO, bastions first.

Each push is `python -m enclave.pushrun` (the program's local.Command), against the lab's real sshd at droplet
defaults (MaxStartups 10:30:100) and the real OpenSSH client; the rollback window is the program's (90 s), so
a push confirmed too late would show as a rollback. Figures: wall time of the run, per-push time (from each
run's JSON), rollbacks, and what the bastion saw: SSH logins (sshd's log), its established TCP connections on
port 22 (sampled with `ss` in its namespace during the run) and handshakes sshd dropped (MaxStartups).

The stack is prod with its counts scaled (scaled_stack), so the rules are prod's. Needs root; hold
`flock /tmp/enclave-heavy.lock` for 100 hosts.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from config.stackfile import Stack, load_stack_file

from .netns import BenchError
from .report import Table

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (100,)
DEFAULT_PARALLEL = 16  # `pulumi up`'s default on a 4-core laptop (4 x CPUs)


def scaled_stack(hosts: int, directory: Path, name: str | None = None) -> Stack:
    """prod with `hosts` hosts: one tunnel (the bastion), one haproxy-www, the rest split between wordpress and
    mysql (the roles with peers on both sides, so every host has real ipsets)."""
    if hosts < 4:
        raise ValueError("a scaled prod needs at least 4 hosts (tunnel, haproxy-www, wordpress, mysql)")
    doc: dict[str, Any] = copy.deepcopy(yaml.safe_load((ROOT / "stacks" / "Pulumi.prod.yaml").read_text()))
    roles = doc["config"]["enclave:roles"]
    rest = hosts - 2
    counts = {"tunnel": 1, "haproxy-www": 1, "wordpress": (rest + 1) // 2, "mysql": rest // 2}
    for role, count in counts.items():
        roles[role]["count"] = count
    name = name or f"prod{hosts}"
    path = directory / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_stack_file(path)


def _bastion_connections(lab: Any, bastion: str, stop: threading.Event, inbound: list[int], outbound: list[int]) -> None:
    """Established TCP connections in the bastion's namespace: to its sshd (from the operator), and from it to
    the hosts' port 22 (each push's and confirm's channel through the master is one)."""
    while not stop.is_set():
        for seen, side in ((inbound, "sport"), (outbound, "dport")):
            out = lab.run(bastion, ["ss", "-Htn", "state", "established", f"( {side} = :22 )"]).stdout
            seen.append(len([line for line in out.splitlines() if line.strip()]))
        stop.wait(0.2)


def push_fleet(hosts: int, parallel: int, directory: Path) -> dict[str, Any]:
    from enclave.lab.lab import Lab  # the lab needs root; imported when run

    stack = scaled_stack(hosts, directory)
    with Lab(stack) as lab:
        bastion = lab.policy.bastion_hosts()[0].name
        stop, inbound, outbound = threading.Event(), [0], [0]
        sampler = threading.Thread(target=_bastion_connections, args=(lab, bastion, stop, inbound, outbound), daemon=True)
        sampler.start()
        started = time.monotonic()
        failures = lab.push_all(parallel, continue_on_error=False)
        wall = time.monotonic() - started
        stop.set()
        sampler.join()
        seconds = [json.loads(out)["seconds"] for out in lab.push_stdout.values()]
        rollbacks = sum((lab.state_dir(h.name) / "rolled-back").exists() for h in lab.hosts)
        log = (lab.host_dir(bastion) / "sshd.log").read_text(errors="replace")
        return {
            "hosts": hosts, "parallel": parallel, "wall": wall, "failures": len(failures),
            "median": statistics.median(seconds) if seconds else 0.0, "max": max(seconds, default=0.0),
            "rollbacks": rollbacks, "logins": log.count("Accepted publickey"),
            "connections": max(inbound), "forwarded": max(outbound), "drops": log.count("drop connection"),
            "load": os.getloadavg(),
        }


def run(sizes: tuple[int, ...] = DEFAULT_SIZES, parallel: int = DEFAULT_PARALLEL) -> list[Table]:
    import tempfile

    rows: list[list[str]] = []
    loads: list[str] = []
    for hosts in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = push_fleet(hosts, parallel, Path(tmp))
            except PermissionError as exc:
                raise BenchError(f"the push benchmark builds a lab and needs root: {exc}") from None
        print(f"push: {r}")
        rows.append([
            str(r["hosts"]), str(r["parallel"]), f"{r['wall']:.1f} s", f"{r['median']:.1f} s / {r['max']:.1f} s",
            f"{r['hosts'] - r['failures']} / {r['failures']}", str(r["rollbacks"]), str(r["logins"]),
            str(r["connections"]), str(r["forwarded"]), str(r["drops"]),
        ])
        loads.append(f"{r['hosts']} hosts: load average {r['load'][0]:.1f} at the end of the run")
    return [Table(
        "Pushes in the lab as `pulumi up` runs them",
        "`python -m enclave.pushrun` per host (the program's local.Command), started FIFO at the engine's "
        "parallelism, bastion first, without --continue-on-error; real sshd at droplet defaults (MaxStartups "
        "10:30:100), the real OpenSSH client through the bastion's one multiplexed connection, the program's "
        "90 s rollback window; prod's rules with its counts scaled. The machine was shared with other work.",
        ["hosts", "parallel", "run", "per push (median / max)", "confirmed / failed", "rollbacks",
         "bastion SSH logins", "TCP connections to the bastion's sshd (max)",
         "bastion -> hosts :22 (max)", "handshakes dropped"],
        rows,
        notes=["bastion SSH logins: sshd's `Accepted publickey` lines on the bastion (its own push, its confirm, "
               "the shared master); TCP connections: `ss` in the bastion's namespace every 0.2 s during the run; "
               "bastion -> hosts: the pushes' and confirms' forwarded connections at once (at most 10 per bastion: "
               "the push's handshake cap); dropped: sshd's `drop connection` (MaxStartups) lines.",
               "Shared machine (2 cores, other engineers' tests and benchmarks running): " + "; ".join(loads) + "."],
    )]
