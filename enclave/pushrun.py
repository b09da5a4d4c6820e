"""One host's whole push, run on the operator's machine: what `pulumi up` runs per host, and what the lab runs.

The Pulumi program gives every host ONE pulumi-command `local.Command` whose single run is this module:

    create: .venv/bin/python -m enclave.pushrun      (relative to the project directory, see COMMAND)
    stdin:  PushRequest.to_stdin()                   (small, no secret, no path of the operator's machine)
    env:    ENCLAVE_SSH_PRIVATE_KEY (+ ENCLAVE_SSH_PREVIOUS_PRIVATE_KEY while rotating), secrets

It pushes the host's rules over OpenSSH, confirms them over a new connection, and exits 0 only once the host has
confirmed; any failure exits non-zero naming the host and the reason, so Pulumi keeps the previous state and the
next `pulumi up` runs the whole push again. The lab runs exactly this command line from its operator namespace.

Exit status: 0 confirmed; 1 the host refused (rules rejected, or not in force when confirmed: rolled back);
2 a bad request or environment (nothing was attempted); 255 the host could not be reached or logged in to
before the deadline (ssh's own code: a host down, booting, a changed host key); 128+N killed by signal N.
Stdout is one JSON line: on success {"host", "digest", "via", "pushedVia", "attempts", "seconds"}; on failure
{"host", "digest", "failed": "request"|"push"|"confirm", "reason"}; stderr says the same for a person.

How the run goes (the transport is enclave/transport.py):
  push     through the first of `bastions` that reaches the host, else the bastion the previous run confirmed
           through (PULUMI_COMMAND_STDOUT's "via": a replaced bastion's successor may not be admitted yet), logging
           in with the new key or else the previous one; retried with backoff while no bastion reaches the host
           (a droplet still booting), until `deadline_s`. A host that answers and refuses the rules is not retried.
  confirm  a NEW connection (through the first bastion, the one every later push uses; a bastion directly),
           logging in with the new key only, retried until the deadline; once the host rolled back by itself,
           the late confirm gets in and fails naming the reason.
A run killed at any point leaves the host either unchanged or rolling back by itself; the next run pushes again.
Killed with SIGKILL (how the engine cancels it), its guard removes its key files and kills its ssh clients
(enclave/runguard.py); left behind by a killed `/bin/sh -c` (dash does not exec the command), it notices its
parent is gone and stops as on SIGTERM.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from .exitcodes import PushExit
from .push import confirm_script, digest, push_script
from .rulefiles import RuleFiles
from .transport import SSH_FAILED, Result, Transport, TransportError, TransportLike

if TYPE_CHECKING:  # the run itself needs neither: importing them costs about a second per push (enclave.rulefiles)
    from .compiler import Addresses, Host, Policy

# The command line the program's local.Command runs. Relative: the Pulumi engine starts providers in the project
# directory, and an absolute path of one operator's machine in an input would re-push every host when a colleague
# runs `pulumi up` from another checkout.
MODULE = "enclave.pushrun"
COMMAND = f".venv/bin/python -m {MODULE}"
ENV_PRIVATE_KEY = "ENCLAVE_SSH_PRIVATE_KEY"
ENV_PREVIOUS_PRIVATE_KEY = "ENCLAVE_SSH_PREVIOUS_PRIVATE_KEY"
ENV_PREVIOUS_STDOUT = "PULUMI_COMMAND_STDOUT"  # pulumi-command hands an update the previous run's stdout
EXIT_CONFIRMED, EXIT_REFUSED, EXIT_BAD_REQUEST, EXIT_UNREACHABLE = (
    PushExit.CONFIRMED, PushExit.REFUSED, PushExit.BAD_REQUEST, PushExit.UNREACHABLE)  # enclave.exitcodes
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 15.0
ORPHAN_POLL_S = 0.5  # how soon a run whose parent was killed notices
REQUEST_VERSION = 1


def _pack_files(files: RuleFiles) -> str:
    text = json.dumps(
        [files.host, files.ipv4, files.ipv6, files.ipsets, list(files.set_names), list(files.peers)],
        separators=(",", ":"),
    )
    # level 6, not 9: as small within 1% on rule files, 4x faster (level 9 was 26 s of a 3 000-host mocked run)
    return base64.b64encode(zlib.compress(text.encode(), 6)).decode()


def _unpack_files(packed: str) -> RuleFiles:
    host, ipv4, ipv6, ipsets, set_names, peers = json.loads(zlib.decompress(base64.b64decode(packed)))
    return RuleFiles(host, ipv4, ipv6, ipsets, tuple(set_names), tuple(peers))


@dataclass(frozen=True)
class PushRequest:
    """Everything one host's push needs except the key, which arrives as a secret environment variable.

    address   where to dial the host: its public address (bastions, stacks without bastions) or its private one
    bastions  public addresses of the bastions to jump through, preferred first; () to dial `address` directly
    files     the host's rule files; baseline: its role's baseline (refreshed on the host by every push)
    public_key the OpenSSH public key the host must authorize for `user` (installed by the push: key rotation)
    deadline_s how long the whole run may keep retrying (a droplet still booting) before it fails
    repush    the stack's re-push counter of this host (enclave:repush): the run ignores it; raising it changes
              the input, so the engine re-runs the push as an update, previous output (PULUMI_COMMAND_STDOUT)
              and with it the bastion fallback kept. Written only when above 0: no other request changes.
    """

    stack: str
    host: str
    user: str
    address: str
    bastions: tuple[str, ...]
    files: RuleFiles
    baseline: RuleFiles
    public_key: str
    deadline_s: int
    repush: int = 0

    def to_stdin(self) -> str:
        """Compact JSON, rule files compressed: this is what Pulumi stores as the command's input."""
        document: dict[str, Any] = {
            "version": REQUEST_VERSION,
            "stack": self.stack,
            "host": self.host,
            "user": self.user,
            "address": self.address,
            "bastions": list(self.bastions),
            "files": _pack_files(self.files),
            "baseline": _pack_files(self.baseline),
            "publicKey": self.public_key,
            "deadlineSeconds": self.deadline_s,
        }
        if self.repush:
            document["repush"] = self.repush
        return json.dumps(document, separators=(",", ":"), sort_keys=True) + "\n"

    @classmethod
    def from_stdin(cls, text: str) -> PushRequest:
        data = json.loads(text)
        if data.get("version") != REQUEST_VERSION:
            raise ValueError(f"push request version {data.get('version')!r}, expected {REQUEST_VERSION}")
        return cls(
            stack=data["stack"],
            host=data["host"],
            user=data["user"],
            address=data["address"],
            bastions=tuple(data["bastions"]),
            files=_unpack_files(data["files"]),
            baseline=_unpack_files(data["baseline"]),
            public_key=data["publicKey"],
            deadline_s=int(data["deadlineSeconds"]),
            repush=int(data.get("repush", 0)),
        )

    @property
    def direct(self) -> bool:
        """Dialed on its own address: a bastion (or any host of a stack without bastions)."""
        return not self.bastions or self.address in self.bastions


def push_request(stack: str, policy: Policy, addresses: Mapping[str, Addresses], host: Host, files: RuleFiles,
                 *, user: str, public_key: str, deadline_s: int, bastions: Sequence[str] | None = None) -> PushRequest:
    """The request of one host as the program, the lab and `enclave audit` build it: bastions (and every host of
    a stack without bastions) dialed on their public address, every other host on its private address through
    the stack's bastions (their public addresses, the first one first: the jump host of `enclave ssh-config`)."""
    from .render import baseline_files  # here, not at the top: the run itself must start fast (enclave.rulefiles)

    jumps = [addresses[b.name].require_public(b.name) for b in policy.bastion_hosts()] if bastions is None else list(bastions)
    direct = not jumps or policy.stack.roles[host.role].bastion
    return PushRequest(
        stack=stack,
        host=host.name,
        user=user,
        address=addresses[host.name].require_public(host.name) if direct else addresses[host.name].private,
        bastions=() if direct else tuple(jumps),
        files=files,
        baseline=baseline_files(policy.stack, host.role),
        public_key=public_key,
        deadline_s=deadline_s,
    )


# ----------------------------------------------------------------------------------------------- the run


class PushError(Exception):
    def __init__(self, step: str, code: int, reason: str) -> None:
        super().__init__(reason)
        self.step, self.code, self.reason = step, code, reason


def previous_via(previous_stdout: str | None) -> str | None:
    """The bastion the previous run confirmed through, from its stdout (None: first run, or unreadable)."""
    try:
        via = json.loads((previous_stdout or "").strip().splitlines()[-1]).get("via")
    except (ValueError, IndexError, AttributeError):
        return None
    return via if isinstance(via, str) and via else None


def push_routes(request: PushRequest, previous_stdout: str | None) -> list[str | None]:
    """The bastions to push through, in order (None: dial the host itself): the request's, then the one the
    previous run confirmed through if the request no longer names it (a replaced bastion's predecessor)."""
    if request.direct:
        return [None]
    old = previous_via(previous_stdout)
    return [*request.bastions, *([old] if old and old not in request.bastions else [])]


def _remote_shell(user: str) -> str:
    return "sh -s" if user == "root" else "sudo -n sh -s"  # the scripts need root; a non-root login has sudo


def _why(result: Result, host: str, where: str, known_hosts: str) -> str:
    text = result.stderr.strip() or result.stdout.strip() or "no output"
    if result.host_key_changed:
        changed = result.changed_host_key_address or where
        who = host if changed not in where.split()[1:] else f"the bastion {changed}, on the way to {host}"
        return (f"the host key of {who} ({changed}) changed since it was first pushed: a droplet rebuilt from the "
                f"panel, or someone in between. Check it (the droplet's console: `ssh-keygen -lf "
                f"/etc/ssh/ssh_host_ed25519_key.pub`), then `ssh-keygen -R {changed} -f {known_hosts}` and push again")
    return text[-2000:]


def run(request: PushRequest, transport: TransportLike, previous_stdout: str | None = None) -> dict[str, Any]:
    """Push, then confirm over a new connection; the JSON document of a confirmed push, or PushError."""
    started = time.monotonic()
    deadline = started + request.deadline_s
    d = digest(request.files)
    shell = _remote_shell(request.user)
    # The push also refreshes the host's baseline (a recovery then restores today's operators) and authorizes
    # the stack's current key for the login user; the confirm, logging in with that key, retires the key enclave
    # authorized before (key rotation, enclave/push.py).
    pushed_script = push_script(request.files, request.stack, baseline=request.baseline, ssh_user=request.user,
                                ssh_public_key=request.public_key, install_wait_s=request.deadline_s)
    confirm_text = confirm_script(request.files, request.stack, ssh_user=request.user,
                                  ssh_public_key=request.public_key)

    routes = push_routes(request, previous_stdout)
    attempts, backoff = 0, BACKOFF_FIRST_S
    pushed_via: str | None = None
    while True:
        attempts += 1
        failures = []
        for via in routes:
            result = transport.run(via, shell, pushed_script, confirm=False, deadline=deadline)
            where = request.address if via is None else f"{request.address} through {via}"
            if result.returncode == 0:
                pushed_via = via
                sys.stderr.write(result.stdout)  # the host's own words ("applied rules …"), for the log
                break
            if result.returncode != SSH_FAILED:  # the host answered and said no: retrying changes nothing
                raise PushError("push", EXIT_REFUSED, f"the host refused rules {d}: {_why(result, request.host, where, str(transport.known_hosts))}")
            if result.host_key_changed:
                # `where` names the bastion it went through: _why tells the host's key from that bastion's
                raise PushError("push", EXIT_UNREACHABLE, _why(result, request.host, where, str(transport.known_hosts)))
            failures.append(f"{where}: {_why(result, request.host, where, str(transport.known_hosts))}")
        else:
            if time.monotonic() + backoff < deadline:
                time.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            raise PushError("push", EXIT_UNREACHABLE,
                            f"SSH could not reach {request.host} in {attempts} attempt(s) within {request.deadline_s} s "
                            f"(is it up, its sshd running, and does it admit SSH from the bastion?): " + "; ".join(failures))
        break

    confirm_via = None if request.direct else request.bastions[0]
    backoff = BACKOFF_FIRST_S
    while True:
        attempts += 1
        result = transport.run(confirm_via, shell, confirm_text, confirm=True, deadline=deadline)
        if result.returncode == 0:
            sys.stderr.write(result.stdout)
            break
        where = request.address if confirm_via is None else f"{request.address} through {confirm_via}"
        if result.returncode != SSH_FAILED or result.host_key_changed or time.monotonic() + backoff >= deadline:
            code = EXIT_REFUSED if result.returncode != SSH_FAILED else EXIT_UNREACHABLE
            hint = "" if code == EXIT_REFUSED else (
                " (the push applied, then a new SSH connection could not get in: do the new rules still admit SSH "
                "from the bastion, and does the host know the new key? Unconfirmed, the host rolls back by itself)")
            raise PushError("confirm", code, _why(result, request.host, where, str(transport.known_hosts)) + hint)
        time.sleep(backoff * (0.5 + random.random() / 2))
        backoff = min(backoff * 2, BACKOFF_MAX_S)
    return {
        "host": request.host,
        "digest": d,
        "via": confirm_via,
        "pushedVia": pushed_via,
        "attempts": attempts,
        "seconds": round(time.monotonic() - started, 2),
    }


def _raise_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the transport's cleanup (the key files)


def _stop_when_orphaned(parent: int) -> None:
    """SIGTERM this run once its parent is gone. pulumi-command runs `/bin/sh -c COMMAND` and cancels by SIGKILLing
    that shell; dash (Debian's /bin/sh) forks the command rather than exec it, so the kill leaves this run behind
    the shell, still holding the engine's stdout pipe (the engine waits for it) and pushing on. It then stops
    the way a SIGTERM stops it: its ssh killed, its key removed."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_on_signal)
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    text = sys.stdin.read()
    host, d = "?", "?"

    def fail(step: str, code: int, reason: str) -> int:
        print(json.dumps({"host": host, "digest": d, "failed": step, "reason": reason}, separators=(",", ":")))
        print(f"enclave push {host}: {step} of rules {d} failed: {reason}", file=sys.stderr)
        return code

    try:
        request = PushRequest.from_stdin(text)
    except (ValueError, KeyError, TypeError) as exc:
        return fail("request", EXIT_BAD_REQUEST,
                    f"stdin is not a push request ({type(exc).__name__}: {exc}); it is PushRequest.to_stdin(), written by "
                    "the Pulumi program (or the lab)")
    host, d = request.host, digest(request.files)
    key = os.environ.get(ENV_PRIVATE_KEY, "")
    if "PRIVATE KEY" not in key:
        return fail("request", EXIT_BAD_REQUEST,
                    f"{ENV_PRIVATE_KEY} does not hold a private key: the program sets it from the secret "
                    "enclave:sshPrivateKey (`pulumi config set --secret sshPrivateKey < ~/.ssh/enclave-<stack>`)")
    previous = os.environ.get(ENV_PREVIOUS_PRIVATE_KEY) or None
    previous_stdout = os.environ.get(ENV_PREVIOUS_STDOUT)
    hops = [via for via in push_routes(request, previous_stdout) if via is not None]
    # The engine cancels a push with SIGKILL to this process alone: lead a process group of our own, so the
    # transport's guard can kill our ssh clients with us (enclave/runguard.py), and only them.
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)
    try:
        with Transport(stack=request.stack, user=request.user, private_key=key, previous_private_key=previous,
                       address=request.address, bastions=hops, kill_group=True) as transport:
            document = run(request, transport, previous_stdout)
    except TransportError as exc:
        return fail("request", EXIT_BAD_REQUEST, str(exc))
    except PushError as exc:
        return fail(exc.step, exc.code, exc.reason)
    print(json.dumps(document, separators=(",", ":")))
    print(f"enclave push {host}: rules {d} confirmed over a new connection"
          + (f" through {document['via']}" if document["via"] else ""), file=sys.stderr)
    return EXIT_CONFIRMED


if __name__ == "__main__":
    sys.exit(main())
