"""The lab's push scheduler (enclave.lab.scheduler) orders pushes as the Pulumi engine does, with fake pushes:
no root, no SSH. A fake push ends at once with its scripted outcome, or, when scripted to hang, runs until it
is killed."""

from __future__ import annotations

import subprocess
import threading

import pytest

from enclave.lab.scheduler import PushFailed, PushHandle, run_pushes

OK, FAIL, HANG = "ok", "fail", "hang"


class FakePushes:
    """start(host) for run_pushes, recording what the scheduler did in order: ("start", h) and ("end", h)."""

    def __init__(self, outcomes: dict[str, str] | None = None) -> None:
        self.outcomes = outcomes or {}
        self.events: list[tuple[str, str]] = []
        self.running = 0
        self.most_at_once = 0
        self.killed: list[str] = []

    def start(self, host: str) -> PushHandle:
        self.events.append(("start", host))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        return FakePush(self, host, self.outcomes.get(host, OK))

    def finished(self, host: str, failure: PushFailed | None) -> None:
        self.running -= 1
        self.events.append(("end", host))

    @property
    def started(self) -> list[str]:
        return [h for kind, h in self.events if kind == "start"]


class FakePush:
    def __init__(self, pushes: FakePushes, host: str, outcome: str) -> None:
        self.pushes, self.host, self.outcome = pushes, host, outcome
        self.cancelled = threading.Event()

    def wait(self) -> None:
        if self.outcome == HANG:
            assert self.cancelled.wait(60), f"{self.host}: a hanging fake push was never killed"
            raise PushFailed(self.host, "killed", subprocess.CompletedProcess([], -9, "", "killed"))
        if self.outcome == FAIL:
            raise PushFailed(self.host, "push", subprocess.CompletedProcess([], 1, "", "refused"))

    def kill(self) -> None:
        self.pushes.killed.append(self.host)
        self.cancelled.set()


def run(pushes: FakePushes, bastions: list[str], others: list[str], **options: object) -> dict[str, PushFailed]:
    options.setdefault("parallel", 4)
    options.setdefault("continue_on_error", False)
    return run_pushes(bastions, others, pushes.start, finished=pushes.finished, **options)  # type: ignore[arg-type]


def test_every_host_is_pushed_first_in_first_out_at_most_parallel_at_once() -> None:
    pushes = FakePushes()
    hosts = [f"web-{i}" for i in range(1, 10)]
    assert run(pushes, [], hosts, parallel=3) == {}
    assert pushes.started == hosts
    assert pushes.most_at_once == 3
    assert pushes.running == 0


def test_the_bastions_are_pushed_before_any_host_behind_them() -> None:
    pushes = FakePushes()
    assert run(pushes, ["bastion-1", "bastion-2"], ["web-1", "mysql-1"], parallel=8) == {}
    assert pushes.started == ["bastion-1", "bastion-2", "web-1", "mysql-1"]
    first_other = pushes.events.index(("start", "web-1"))
    assert {("end", "bastion-1"), ("end", "bastion-2")} <= set(pushes.events[:first_other])


def test_the_first_failure_starts_nothing_more_and_what_runs_finishes() -> None:
    pushes = FakePushes({"web-1": FAIL})
    failures = run(pushes, [], ["web-1", "web-2", "web-3", "web-4"], parallel=2)
    assert pushes.started == ["web-1", "web-2"]  # web-2 was already running: it finished, it was not killed
    assert pushes.killed == [] and ("end", "web-2") in pushes.events
    assert failures["web-1"].step == "push"
    assert {h: f.step for h, f in failures.items() if h != "web-1"} == {"web-3": "not started", "web-4": "not started"}
    assert "cancelled" in str(failures["web-3"])


def test_continue_on_error_tries_every_host() -> None:
    pushes = FakePushes({"web-1": FAIL, "web-3": FAIL})
    failures = run(pushes, ["bastion-1"], ["web-1", "web-2", "web-3", "web-4"], parallel=1, continue_on_error=True)
    assert pushes.started == ["bastion-1", "web-1", "web-2", "web-3", "web-4"]
    assert sorted(failures) == ["web-1", "web-3"]


@pytest.mark.parametrize("continue_on_error", [True, False])
def test_no_host_behind_a_failed_bastion_push_is_started(continue_on_error: bool) -> None:
    pushes = FakePushes({"bastion-1": FAIL})
    failures = run(pushes, ["bastion-1", "bastion-2"], ["web-1", "mysql-1"], parallel=4,
                   continue_on_error=continue_on_error)
    assert set(pushes.started) <= {"bastion-1", "bastion-2"}
    assert failures["bastion-1"].step == "push"
    for host in ("web-1", "mysql-1"):
        assert failures[host].step == "not started"
        assert "bastion push bastion-1 failed" in str(failures[host])


def test_with_continue_on_error_a_failed_bastion_push_skips_every_other_host_but_not_the_other_bastions() -> None:
    """As the engine does (enclave.lab.scheduler's docstring cites its source): the other bastion is still pushed,
    every non-bastion push is skipped, even those that could have gone through the other bastion."""
    pushes = FakePushes({"bastion-1": FAIL})
    failures = run(pushes, ["bastion-1", "bastion-2"], ["web-1", "mysql-1"], parallel=1, continue_on_error=True)
    assert pushes.started == ["bastion-1", "bastion-2"]
    assert sorted(failures) == ["bastion-1", "mysql-1", "web-1"]
    assert "skipped: bastion push bastion-1 failed" in str(failures["web-1"])


def test_without_continue_on_error_a_failed_bastion_push_starts_nothing_more() -> None:
    pushes = FakePushes({"bastion-1": FAIL})
    failures = run(pushes, ["bastion-1", "bastion-2"], ["web-1"], parallel=1)
    assert pushes.started == ["bastion-1"]
    assert {h: f.step for h, f in failures.items()} == {"bastion-1": "push", "bastion-2": "not started",
                                                       "web-1": "not started"}


def test_kill_after_cancels_the_running_pushes_and_starts_nothing_more() -> None:
    pushes = FakePushes({"web-2": HANG, "web-3": HANG})
    failures = run(pushes, [], ["web-1", "web-2", "web-3", "web-4", "web-5"], parallel=3, kill_after=1)
    assert pushes.started == ["web-1", "web-2", "web-3"]
    assert sorted(pushes.killed) == ["web-2", "web-3"]
    assert {h: f.step for h, f in failures.items()} == {
        "web-2": "killed", "web-3": "killed", "web-4": "not started", "web-5": "not started"}


def test_an_error_of_the_scheduler_s_own_kills_what_runs() -> None:
    """A bug in a push handle (or Ctrl-C) never leaves pushes running behind the scheduler."""
    pushes = FakePushes({"web-2": HANG})

    def start(host: str) -> PushHandle:
        if host == "web-3":
            raise RuntimeError("could not start")
        return pushes.start(host)

    with pytest.raises(RuntimeError, match="could not start"):
        run_pushes([], ["web-1", "web-2", "web-3"], start, parallel=3, continue_on_error=True)
    assert sorted(pushes.killed) == ["web-1", "web-2"]  # every push it had started and not yet seen end


def test_parallel_must_admit_a_push() -> None:
    with pytest.raises(ValueError, match="parallel 0"):
        run(FakePushes(), [], ["web-1"], parallel=0)
