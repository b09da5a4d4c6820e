"""The lab's push scheduler: how `pulumi up` runs the pushes of a stack (one pulumi-command resource per host).

The engine starts ready resources first in, first out, at most `--parallel` at once (its default 4 x CPUs).
Every other host's push `depends_on` every bastion's push (it goes through them; components/network.py). The
Python SDK registers a resource only once the URNs of its `depends_on` resolve, i.e. once those registrations
returned (pulumi/runtime/resource.py `_resolve_depends_on_urns`), so the others are registered, and started,
only when every bastion push has ended. Then:

- plain `pulumi up`: the first failed step cancels the deployment (pkg/resource/deploy/step_executor.go
  `cancelDueToError`, L435-462): what runs finishes, nothing more starts;
- `--continue-on-error`: a failed step is recorded instead, and each step generated later whose resource
  depends on a failed or skipped URN (parent, dependsOn, property dependencies, deletedWith, replaceWith) is
  skipped, transitively (deployment_executor.go L630-642, `doesStepDependOn` L559-574). Every other bastion's
  push still runs; if any bastion push failed, every non-bastion push is skipped.

A cancelled run (Ctrl-C twice, a killed engine) kills what runs and starts nothing.

The scheduler knows pushes only through a seam, `start(host) -> PushHandle` (wait, kill): the lab hands it
real `python -m enclave.pushrun` processes, the unit tests fakes. No root, no subprocess here.
"""

from __future__ import annotations

import queue as queue_module
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from .machine import LabError


class PushFailed(LabError):
    """One host's `python -m enclave.pushrun` did not confirm. step: what its JSON says failed (request, push,
    confirm), or `killed` (the run was cancelled while it ran) or `not started` (cancelled before it started)."""

    def __init__(self, host: str, step: str, result: subprocess.CompletedProcess[str]) -> None:
        self.host, self.step, self.result = host, step, result
        output = (result.stderr.strip() or result.stdout.strip() or "no output")[-3000:]
        # The run's verdict is its last line (`enclave push HOST: confirm of rules D failed: why`): first, so a
        # message cut short (pytest's summary line, a narrow terminal) still says why; the whole output follows.
        verdict = output.splitlines()[-1]
        super().__init__(f"{step} to {host} failed (exit {result.returncode}): {verdict}"
                         + (f"\n{output}" if output != verdict else ""))


def not_started(host: str, why: str) -> PushFailed:
    return PushFailed(host, "not started", subprocess.CompletedProcess([], 0, "", why))


class PushHandle(Protocol):
    """One running push."""

    def wait(self) -> None:
        """Until the push ended; raises PushFailed when it did not confirm (step `killed` once kill() ran)."""
        ...

    def kill(self) -> None:
        """Cancel the push now, as the engine does: SIGKILL to the run alone (its guard kills its ssh and removes
        its key: enclave/runguard.py); wait() then returns or raises soon."""
        ...


def run_pushes(bastions: Sequence[str], others: Sequence[str], start: Callable[[str], PushHandle], *,
               parallel: int, continue_on_error: bool, kill_after: int | None = None,
               finished: Callable[[str, PushFailed | None], None] = lambda host, failure: None) -> dict[str, PushFailed]:
    """Run every host's push as the engine orders them (module docstring): the bastions first in their order,
    then the others in theirs, at most `parallel` at once. kill_after: cancel the run once that many pushes
    finished. finished(host, failure or None) is called as each push ends, in the caller's thread.

    Returns the hosts that did not confirm, with step `not started` for those never started.
    """
    if parallel < 1:
        raise ValueError(f"parallel {parallel}: at least one push at a time")
    failures: dict[str, PushFailed] = {}
    queue = list(bastions) or list(others)
    waiting = list(others) if bastions else []
    running: dict[str, PushHandle] = {}
    ended: queue_module.Queue[tuple[str, BaseException | None]] = queue_module.Queue()
    done = 0
    stopped = False

    def wait(host: str, handle: PushHandle) -> None:
        try:
            handle.wait()
        except BaseException as exc:  # handed to the scheduler's thread, which decides
            ended.put((host, exc))
        else:
            ended.put((host, None))

    try:
        while queue or running or waiting:
            while queue and len(running) < parallel and not stopped:
                host = queue.pop(0)
                running[host] = start(host)
                threading.Thread(target=wait, args=(host, running[host]), daemon=True).start()
            if not running:
                break
            host, error = ended.get()
            del running[host]
            done += 1
            if error is not None and not isinstance(error, PushFailed):
                raise error
            if error is not None:
                failures[host] = error
                stopped = stopped or not continue_on_error
            finished(host, error)
            if kill_after is not None and done >= kill_after and not stopped:
                stopped = True
                for handle in running.values():
                    handle.kill()
            if not queue and not running and waiting:  # the bastions are done: their dependents become ready
                failed = [b for b in bastions if b in failures]
                if failed:
                    why = (f"skipped: bastion push {', '.join(failed)} failed, and every other push depends on "
                           "every bastion push (the engine skips the dependents of a failed step)")
                    failures.update((h, not_started(h, why)) for h in waiting)
                    waiting = []
                queue, waiting = waiting, []
    except BaseException:
        for handle in running.values():  # never leave a push running behind an error or a Ctrl-C
            handle.kill()
        raise
    failures.update((h, not_started(h, "the run was cancelled")) for h in queue + waiting)
    return failures
