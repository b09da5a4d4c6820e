"""The guard of one push run: removes the run's private files and kills its ssh once the run is gone.

The Pulumi engine cancels a push (Ctrl-C, a cancelled deployment, a resource timeout) by SIGKILLing its command's
direct child (pulumi-command: `exec.CommandContext`, no process group, no grace), so the run's own cleanup never
runs. This guard is a separate process in a session of its own, started by enclave.transport before the run
writes its key: it blocks reading a pipe whose only write end the run holds. The kernel closes that end when the
run exits, however it exits:

  reads "done"  the run ended normally and removed its files itself: nothing to do
  reads EOF     the run died: SIGKILL its process group (its `ssh` clients and their ProxyJump children; the run
                is its group's leader, and the group's id cannot be reused while a member lives) and remove its
                directory (the key files, the generated ssh config)

It holds none of the run's stdout/stderr (the engine reads those until EOF) and imports nothing of enclave: it runs
as a plain script (`python -I runguard.py FD DIR GROUP`). A bastion's shared ControlMaster is not the run's: it
serves every push of the deployment and exits by itself CONTROL_PERSIST_S after its last session.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

DONE = b"done"


def main(argv: list[str]) -> int:
    fd, run_dir, group = int(argv[1]), argv[2], int(argv[3])
    with os.fdopen(fd, "rb") as pipe:
        said = pipe.read()  # until the run writes DONE and closes it, or dies
    if said == DONE:
        return 0
    if group > 0:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # no member left
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
