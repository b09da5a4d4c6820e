"""Issue 12: command-line flags given hostile or mistaken values get exit 2 and a message naming the flag,
never a traceback, and cost no more than their size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from enclave.cli import main
from enclave.compiler import compile_policy
from enclave.plan import example_addresses
from config.stackfile import load_stack

from ..conftest import STACKS


def prod_addresses() -> dict[str, dict[str, Any]]:
    policy = compile_policy(load_stack("prod").config)
    return {host: dict(vars(a)) for host, a in example_addresses(policy).items()}


def plan_with(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | str) -> tuple[int, str]:
    path = tmp_path / "addrs.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    code = main(["plan", "--stack", "prod", "--addresses", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_a_public_address_inside_the_vpc_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    addrs = prod_addresses()
    addrs["mysql-1"]["public"] = "10.110.16.200"
    code, err = plan_with(tmp_path, capsys, json.dumps(addrs))
    assert code == 2 and "--addresses mysql-1" in err and "public 10.110.16.200 is inside vpcIpRange" in err


def test_one_public_address_on_two_hosts_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    addrs = prod_addresses()
    addrs["mysql-2"]["public"] = addrs["mysql-1"]["public"]
    addrs["mysql-2"]["public6"] = addrs["mysql-1"]["public6"].upper()  # one address, another spelling
    code, err = plan_with(tmp_path, capsys, json.dumps(addrs))
    assert code == 2
    assert f"public {addrs['mysql-1']['public']} is mysql-1's too" in err
    assert "public6" in err and "is mysql-1's too" in err


def test_a_scoped_address_cannot_carry_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Python's ipaddress accepts any text after % as an IPv6 scope, a newline included."""
    addrs = prod_addresses()
    addrs["mysql-1"]["public6"] = "2001:db8:e0::14%x\nHost *"
    code, err = plan_with(tmp_path, capsys, json.dumps(addrs))
    assert code == 2 and "public6 must be a plain address, without a %scope" in err


@pytest.mark.parametrize(
    "content,words",
    [
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 8 levels"),
        (b'{"mysql-1": {"public": "\xff"}}', "is not UTF-8 text (byte 0xff"),
        ("{not json", "not valid JSON"),
    ],
)
def test_addresses_that_are_not_addresses_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | str, words: str
) -> None:
    code, err = plan_with(tmp_path, capsys, content)
    assert code == 2 and "--addresses" in err and words in err


@pytest.mark.parametrize("path", ["/dev/null", "/"])
def test_addresses_path_that_is_not_a_file(capsys: pytest.CaptureFixture[str], path: str) -> None:
    assert main(["plan", "--stack", "prod", "--addresses", path]) == 2
    err = capsys.readouterr().err
    assert "--addresses" in err and ("is a directory" in err or "is not a regular file" in err)


# -------------------------------------------------------------------------------------------- diagram


def test_diagram_output_empty_or_a_device_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagram", "--stack", "prod", "--output", ""]) == 2
    assert "--output: is empty" in capsys.readouterr().err
    assert main(["diagram", "--stack", "prod", "--output", "/dev/null"]) == 2
    assert "'/dev/null' is not a regular file" in capsys.readouterr().err
    assert not Path("/dev/null.svg").exists()


def test_diagram_output_a_directory_writes_inside_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "docs").mkdir()
    for given in (str(tmp_path / "docs") + "/", str(tmp_path / "docs")):
        assert main(["diagram", "--stack", "prod", "--output", given]) == 0
        assert (tmp_path / "docs" / "prod.svg").is_file() and (tmp_path / "docs" / "prod.mmd").is_file()
        assert not (tmp_path / "docs.svg").exists()
    fresh = str(tmp_path / "new-dir") + "/"  # a directory to be: made, and the pair written inside
    assert main(["diagram", "--stack", "prod", "--output", fresh]) == 0
    assert (tmp_path / "new-dir" / "prod.mmd").is_file()
    capsys.readouterr()


# ------------------------------------------------------------------------------------- --host, linear


@pytest.mark.parametrize("command", [["plan", "--stack", "prod"], ["plan", "--stack", "prod", "--diff-from", str(STACKS / "Pulumi.prod.yaml")]])
def test_a_long_host_costs_a_short_message(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A 100 000-character --host took 41 s of CPU to say 'no such host'. The message quotes at most 60
    characters of it, so its size (and rich's work on it) is the same for 1 000 or 100 000 characters."""
    sizes = {}
    for length in (1_000, 100_000):
        assert main([*command, "--host", "x" * length]) == 2
        err = capsys.readouterr().err
        assert f"({length} characters)" in err and ("no such host" in err or "in neither stack" in err)
        sizes[length] = len(err) - len(str(length))
    assert sizes[1_000] == sizes[100_000]


def test_a_long_stack_file_path_is_named_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack-file", "/tmp/" + "x" * 100_000]) == 2
    err = capsys.readouterr().err
    assert "--stack-file" in err and "File name too long" in err and len(err) < 1_000
