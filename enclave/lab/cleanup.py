"""Finding and removing lab runs from their names alone (no Lab instance needed): a lab whose controller died is
removed by `enclave lab down` all the same."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .machine import NS_PREFIX, RUN_ID_FORMAT, STATE_FILE, LabError, LabUnavailable, _run, lab_root

# temporary suffix must fit a Unix socket path (107 bytes).
RUNTIME_DIR_MAX = 60

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
