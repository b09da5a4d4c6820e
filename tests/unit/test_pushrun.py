"""enclave.pushrun.run against a fake transport (enclave.transport.TransportLike): retries, the bastion fallback,
the deadline, refused versus unreachable, a changed host key and key rotation, without root or SSH. The clock
and the backoff's randomness are fakes too, so nothing really waits."""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from config.stackfile import load_stack
from enclave import pushrun
from enclave.plan import build_plan
from enclave.pushrun import EXIT_REFUSED, EXIT_UNREACHABLE, PushError, PushRequest, push_request
from enclave.transport import HOST_KEY_CHANGED, SSH_FAILED, Result

# A syntactically valid OpenSSH key line (the push script authorizes it; nothing here checks signatures).
NEW_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE5ld0tleU5ld0tleU5ld0tleU5ld0tleU5ld0tleU5l enclave-new"
BASTION = "203.0.113.10"
SUCCESSOR = "203.0.113.20"
REFUSED = Result(1, "", "enclave push: rules rejected by iptables-restore")
UNREACHABLE = Result(SSH_FAILED, "", "ssh: connect to host 10.10.0.5 port 22: Connection timed out")
CONFIRMED = Result(0, "applied\n", "")


@dataclass(frozen=True)
class Call:
    via: str | None
    confirm: bool
    stdin: str


@dataclass
class FakeTransport:
    """Answers each run() with what `answer(call, calls so far)` says; records every call."""

    answer: Callable[[Call, list[Call]], Result]
    known_hosts: Path = Path("/home/op/.local/state/enclave/dev/known_hosts")
    calls: list[Call] = field(default_factory=list)

    def run(self, via: str | None, command: str, stdin: str, *, confirm: bool, deadline: float) -> Result:
        assert command == "sh -s"  # root logs in; a non-root login would get `sudo -n sh -s`
        call = Call(via, confirm, stdin)
        self.calls.append(call)
        return self.answer(call, self.calls)

    @property
    def pushes(self) -> list[Call]:
        return [c for c in self.calls if not c.confirm]

    @property
    def confirms(self) -> list[Call]:
        return [c for c in self.calls if c.confirm]


class FakeClock:
    """time for pushrun: monotonic() moves only when the run sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(pushrun, "time", fake)
    monkeypatch.setattr(pushrun, "random", types.SimpleNamespace(random=lambda: 1.0))  # the backoff's upper end
    return fake


def request(host: str, *, deadline_s: int = 60, bastions: list[str] | None = None) -> PushRequest:
    plan = build_plan(load_stack("dev"))
    made = push_request("dev", plan.policy, plan.addresses, plan.policy.host_by_name[host], plan.files[host],
                        user="root", public_key=NEW_KEY, deadline_s=deadline_s)
    return made if bastions is None else replace(made, bastions=tuple(bastions))


def behind_bastion(**options: object) -> PushRequest:
    return request("mysql-1", bastions=[BASTION], **options)  # type: ignore[arg-type]


def always(result: Result) -> Callable[[Call, list[Call]], Result]:
    return lambda call, calls: result


def test_a_bastion_is_pushed_and_confirmed_directly(clock: FakeClock) -> None:
    transport = FakeTransport(always(CONFIRMED))
    document = pushrun.run(request("tunnel-1"), transport)
    assert [(c.via, c.confirm) for c in transport.calls] == [(None, False), (None, True)]
    assert document["via"] is None and document["attempts"] == 2 and clock.sleeps == []


def test_a_host_behind_the_bastion_is_pushed_and_confirmed_through_it(clock: FakeClock) -> None:
    transport = FakeTransport(always(CONFIRMED))
    document = pushrun.run(behind_bastion(), transport)
    assert [(c.via, c.confirm) for c in transport.calls] == [(BASTION, False), (BASTION, True)]
    assert document["via"] == BASTION and document["pushedVia"] == BASTION


def test_an_unreachable_host_is_retried_with_backoff_until_it_answers(clock: FakeClock) -> None:
    transport = FakeTransport(lambda call, calls: UNREACHABLE if len(calls) <= 3 else CONFIRMED)
    document = pushrun.run(behind_bastion(), transport)
    assert len(transport.pushes) == 4 and len(transport.confirms) == 1
    assert clock.sleeps == [1.0, 2.0, 4.0]  # doubling from BACKOFF_FIRST_S
    assert document["attempts"] == 5


def test_an_unreachable_host_fails_at_the_deadline_naming_every_attempt(clock: FakeClock) -> None:
    transport = FakeTransport(always(UNREACHABLE))
    with pytest.raises(PushError) as failed:
        pushrun.run(behind_bastion(deadline_s=20), transport)
    assert failed.value.step == "push" and failed.value.code == EXIT_UNREACHABLE
    assert clock.now - 1000.0 <= 20 and sum(clock.sleeps) <= 20
    assert f"in {len(transport.pushes)} attempt(s) within 20 s" in failed.value.reason
    assert "Connection timed out" in failed.value.reason and transport.confirms == []


def test_a_host_that_refuses_the_rules_is_not_retried(clock: FakeClock) -> None:
    transport = FakeTransport(always(REFUSED))
    with pytest.raises(PushError) as failed:
        pushrun.run(behind_bastion(), transport)
    assert failed.value.step == "push" and failed.value.code == EXIT_REFUSED
    assert "rules rejected" in failed.value.reason and len(transport.calls) == 1 and clock.sleeps == []


@pytest.mark.parametrize("changed, who", [("10.10.0.5", "mysql-1"), (BASTION, f"the bastion {BASTION}")])
def test_a_changed_host_key_fails_at_once_naming_whose_and_the_fix(clock: FakeClock, changed: str, who: str) -> None:
    stderr = f"@@@ WARNING: {HOST_KEY_CHANGED}! @@@\nHost key for {changed} has changed and you have requested strict checking."
    transport = FakeTransport(always(Result(SSH_FAILED, "", stderr)))
    with pytest.raises(PushError) as failed:
        pushrun.run(behind_bastion(), transport)
    assert failed.value.code == EXIT_UNREACHABLE and len(transport.calls) == 1
    assert who in failed.value.reason
    assert f"ssh-keygen -R {changed} -f {transport.known_hosts}" in failed.value.reason


def test_the_bastion_the_previous_run_confirmed_through_is_the_fallback(clock: FakeClock) -> None:
    """A replaced bastion: its successor does not admit the host's SSH yet, the old one still does."""
    previous = json.dumps({"host": "mysql-1", "via": BASTION}) + "\n"
    transport = FakeTransport(lambda call, calls: UNREACHABLE if call.via == SUCCESSOR and not call.confirm else CONFIRMED)
    document = pushrun.run(request("mysql-1", bastions=[SUCCESSOR]), transport, previous)
    assert [c.via for c in transport.pushes] == [SUCCESSOR, BASTION]
    assert document["pushedVia"] == BASTION and document["via"] == SUCCESSOR  # every later push uses the new one
    assert clock.sleeps == []


def test_an_unreadable_previous_stdout_adds_no_route(clock: FakeClock) -> None:
    transport = FakeTransport(always(UNREACHABLE))
    with pytest.raises(PushError):
        pushrun.run(request("mysql-1", bastions=[SUCCESSOR], deadline_s=3), transport, "not json")
    assert {c.via for c in transport.pushes} == {SUCCESSOR}


def test_key_rotation_the_push_authorizes_the_new_key_the_confirm_logs_in_with(clock: FakeClock) -> None:
    """The host knows only the previous key: the push (either key) gets in and authorizes the new one, which
    the confirm (new key only) then logs in with."""
    authorized: set[str] = set()

    def host(call: Call, calls: list[Call]) -> Result:
        if call.confirm:
            return CONFIRMED if NEW_KEY.split()[1] in authorized else Result(SSH_FAILED, "", "Permission denied (publickey).")
        if NEW_KEY.split()[1] in call.stdin:
            authorized.add(NEW_KEY.split()[1])
        return CONFIRMED

    transport = FakeTransport(host)
    pushrun.run(behind_bastion(), transport)
    assert len(transport.confirms) == 1 and clock.sleeps == []


def test_a_confirm_that_cannot_log_in_is_retried_then_fails_unreachable_with_the_hint(clock: FakeClock) -> None:
    transport = FakeTransport(lambda call, calls: Result(SSH_FAILED, "", "Permission denied (publickey).")
                              if call.confirm else CONFIRMED)
    with pytest.raises(PushError) as failed:
        pushrun.run(behind_bastion(deadline_s=10), transport)
    assert failed.value.step == "confirm" and failed.value.code == EXIT_UNREACHABLE
    assert len(transport.confirms) > 1 and clock.now - 1000.0 <= 10
    assert "does the host know the new key?" in failed.value.reason and "rolls back by itself" in failed.value.reason


def test_a_confirm_the_host_refuses_is_not_retried(clock: FakeClock) -> None:
    """The host rolled back by itself before the confirm got in: the late confirm names the reason."""
    rolled_back = Result(1, "", "rules 0123 were rolled back: not confirmed within 90 s")
    transport = FakeTransport(lambda call, calls: rolled_back if call.confirm else CONFIRMED)
    with pytest.raises(PushError) as failed:
        pushrun.run(behind_bastion(), transport)
    assert failed.value.step == "confirm" and failed.value.code == EXIT_REFUSED
    assert "rolled back" in failed.value.reason and len(transport.confirms) == 1
