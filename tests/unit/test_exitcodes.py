"""One table of exit codes: what `enclave --help` prints is the enum the commands return."""

from __future__ import annotations

import pytest

from enclave import pushrun, transport
from enclave.cli import main
from enclave.exitcodes import EXPLAINED, Exit, PushExit


def test_help_lists_every_exit_code_with_its_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for code in Exit:
        assert f"  {code.value:>3}  {EXPLAINED[code]}" in lines, code


def test_a_push_run_that_cannot_log_in_exits_as_ssh_does() -> None:
    # pulumi up and the lab read these numbers from the push's exit status: they are a contract
    assert [int(c) for c in PushExit] == [0, 1, 2, 255]
    assert PushExit.UNREACHABLE == transport.SSH_FAILED == pushrun.EXIT_UNREACHABLE


def test_bad_input_exits_2_as_the_table_says(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "no-such-stack"]) == Exit.BAD_INPUT
    assert "no stack 'no-such-stack'" in capsys.readouterr().err
