"""The `enclave` command line's own edges: version, help, stack naming, refusals that name the fix."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from enclave.cli import build_parser, main
from enclave.exitcodes import EXPLAINED, Exit
from enclave.stackargs import DEFAULT_STACK, stack_from_args

from ..conftest import stack_document


def write_stack(path: Path, edit: dict[str, object]) -> Path:
    document = stack_document("dev")
    document["config"].update(edit)
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("key", ["enclave:sshPrivateKey", "enclave:sshPreviousPrivateKey", "digitalocean:token"])
def test_plan_refuses_a_secret_in_clear_in_the_stack_file(key: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write_stack(tmp_path / "Pulumi.dev.yaml", {key: "dop_v1_notasecret-really"})
    assert main(["plan", "--stack-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{key}: is in plain text in the stack file" in err, err
    assert f"`pulumi config set --secret {key}" in err
    assert "notasecret" not in err  # the value is never echoed


def test_plan_accepts_secrets_pulumi_encrypted(tmp_path: Path) -> None:
    path = write_stack(tmp_path / "Pulumi.dev.yaml", {"enclave:sshPrivateKey": {"secure": "v1:AAAA"},
                                                      "digitalocean:token": {"secure": "v1:BBBB"}})
    assert main(["plan", "--stack-file", str(path)]) == 0


ROOT = Path(__file__).resolve().parent.parent.parent


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"enclave {importlib.metadata.version('enclave')}"


def every_command(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += [((*path, name), child), *every_command(child, (*path, name))]
    return found


def test_every_command_has_a_description_and_the_exit_codes_in_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = every_command(build_parser())
    assert {("lab", "check"), ("lab", "up"), ("lab", "down"), ("plan",), ("audit",)} <= {p for p, _ in commands}
    for path, _ in commands:
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        out = capsys.readouterr().out
        description = out.split("\n\n")[1]
        assert not description.startswith(("positional arguments", "options")), f"{path}: no description"
        for code in Exit:
            assert f"  {code.value:>3}  {EXPLAINED[code]}" in out.splitlines(), (path, code)


def test_one_default_stack_for_the_cli_and_make() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^STACK \?= (\S+)$", makefile, re.M).group(1) == DEFAULT_STACK  # type: ignore[union-attr]
    assert build_parser().parse_args(["plan"]).stack is None  # resolved to DEFAULT_STACK by stack_from_args
    assert stack_from_args(build_parser().parse_args(["plan"])).name == DEFAULT_STACK


def test_a_stack_file_not_named_for_its_stack_needs_stack_name(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "my.yaml"
    path.write_text((ROOT / "stacks" / "Pulumi.dev.yaml").read_text())
    assert main(["plan", "--stack-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not named Pulumi.<stack>.yaml" in err and "--stack-name <stack>" in err, err
    assert main(["plan", "--stack-file", str(path), "--stack-name", "dev", "--format", "json"]) == 0
    assert '"stack": "dev"' in capsys.readouterr().out


def test_a_bad_flag_does_not_claim_anything_about_the_stack(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "prod", "--host", "nope-1"]) == 2
    err = capsys.readouterr().err
    assert "--host: 'nope-1': no such host" in err
    assert "nothing was created" not in err


def test_make_setup_refuses_python_below_3_11_naming_the_fix(tmp_path: Path) -> None:
    old_python = tmp_path / "python3"  # answers as Python 3.10 does to the Makefile's two questions
    old_python.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.10;; *) exit 1;; esac\n')
    old_python.chmod(0o755)
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "python-check", f"PYTHON={old_python}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "needs Python 3.11 or newer" in done.stdout and "is 3.10" in done.stdout, done.stdout
    assert "make setup PYTHON=python3.11" in done.stdout
    assert subprocess.run(["make", "-s", "-C", str(ROOT), "python-check"], capture_output=True, timeout=60).returncode == 0
