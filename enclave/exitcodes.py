"""Every exit status enclave's programs return, in one place: `enclave --help` prints this table.

`Exit` is the `enclave` command line's (plan, diagram, ssh-config, audit, lab). `PushExit` is one host's push run
(`python -m enclave.pushrun`, what `pulumi up` runs per host: docs/how-a-push-works.md); it is a contract with
the Pulumi program and the lab, so its numbers never change. A run killed by signal N exits 128+N, as any
process does.
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    """`enclave ...`"""

    OK = 0  # fine: every test passed, every host in sync, the file was written
    FAILED = 1  # a check failed: a stack test, a lab probe, drift found by audit
    BAD_INPUT = 2  # bad input (stack file, flag, addresses, key file); the message names the key or flag
    HARNESS = 3  # the lab's own machinery failed (neighbour table, agent, kernel): no verdict on the rules
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); the lab was removed


class PushExit(enum.IntEnum):
    """`python -m enclave.pushrun` (one host's push)"""

    CONFIRMED = 0  # the host runs the rules and confirmed them
    REFUSED = 1  # the host refused them (rejected, or not in force at confirm: rolled back)
    BAD_REQUEST = 2  # a bad request or environment; nothing was attempted
    UNREACHABLE = 255  # no login before the deadline (ssh's own code: down, booting, a changed host key)


EXPLAINED: dict[Exit, str] = {
    Exit.OK: "fine",
    Exit.FAILED: "a check failed (a stack test, a lab probe, drift found by audit)",
    Exit.BAD_INPUT: "bad input (the message names the key or flag)",
    Exit.HARNESS: "the lab's machinery failed: no verdict on the rules",
    Exit.INTERRUPTED: "interrupted (Ctrl-C); a lab is removed",
}


def exit_code_table() -> str:
    """The `enclave --help` epilog's table: one line per exit code, from the enum itself."""
    return "exit codes:\n" + "\n".join(f"  {code.value:>3}  {EXPLAINED[code]}" for code in Exit)
