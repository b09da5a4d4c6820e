"""Runs `enclave.cli.main` for the property-based test, one command line per request, under a memory limit.

A long-lived subprocess (`python -m tests.cli_worker`), so an example costs a call, not an interpreter start,
and a memory blow-up hits this process's RLIMIT_AS rather than the test runner. Requests and answers are JSON
lines on stdin/stdout: {"argv": [...], "cwd": "..."} -> {"code", "stdout", "stderr", "exception", "cpu_s",
"max_rss_mb"}. The command's own stdout is UTF-8 with strict errors, as a terminal in a UTF-8 locale is, so
printing text it cannot encode is caught as the traceback a user would see.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import time
import traceback
from typing import Any

MEMORY_LIMIT = 2 << 30  # address space: the CLI needs ~300 MB for a prod-sized stack


def run(argv: list[str], cwd: str) -> dict[str, Any]:
    from enclave.cli import main

    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    saved = sys.stdout, sys.stderr, os.getcwd()
    exception = None
    code: object = None
    started = time.process_time()
    try:
        os.chdir(cwd)
        sys.stdout, sys.stderr = stdout, stderr
        code = main(argv)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        code = exc.code
    except BaseException:  # noqa: BLE001 - any other exception is what the test looks for
        exception = traceback.format_exc()
    finally:
        sys.stdout, sys.stderr = saved[0], saved[1]
        os.chdir(saved[2])
    return {
        "code": code,
        "stdout": out.getvalue().decode("utf-8", "replace")[-4000:],
        "stderr": err.getvalue().decode("utf-8", "replace")[-4000:],
        "exception": exception,
        "cpu_s": time.process_time() - started,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def serve() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    import enclave.cli  # noqa: F401 - imported once, before the first request is timed

    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        answers.write(json.dumps(run(request["argv"], request["cwd"])) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
