"""`enclave ssh-config`: every host by name, private ones through the bastion, as OpenSSH itself reads it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.stackfile import load_stack
from enclave.cli import main
from enclave.compiler import compile_policy
from enclave.plan import example_addresses

from ..conftest import stack_document


def resolved(config: Path, alias: str) -> dict[str, str]:
    """What `ssh` would use for `alias` (`ssh -G` parses the config and connects nowhere)."""
    ssh = shutil.which("ssh")
    assert ssh, "OpenSSH client missing: `apt-get install openssh-client` (make setup as root installs it)"
    out = subprocess.run(
        [ssh, "-G", "-F", str(config), alias], capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL
    ).stdout
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, value)  # the first identityfile is the one the config set
    return values


def run_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> Path:
    assert main(["ssh-config", *argv]) == 0
    path = tmp_path / "ssh_config"
    path.write_text(capsys.readouterr().out)
    return path


def test_prod_private_hosts_jump_through_the_bastion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = run_cli(tmp_path, capsys, "--stack", "prod")
    policy = compile_policy(load_stack("prod").config)
    addresses = example_addresses(policy)
    for host in policy.hosts:
        ssh = resolved(config, f"prod-{host.name}")
        assert ssh["user"] == "root"
        assert ssh["identityfile"] == "~/.ssh/enclave-prod" and ssh["identitiesonly"] == "yes"
        if host.role == "tunnel":
            assert ssh["hostname"] == addresses[host.name].public  # the bastion: straight to its public address
            assert "proxyjump" not in ssh
        else:
            assert ssh["hostname"] == addresses[host.name].private  # only reachable on the private network
            assert ssh["proxyjump"] == "prod-tunnel-1"
    assert "stack" not in capsys.readouterr().out  # stdout is the config alone; the note went to stderr


def test_real_addresses_identity_file_and_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = ["tunnel-1", "haproxy-www-1", "wordpress-1", "mysql-1"]
    deployed = {h: {"public": f"203.0.113.{i + 1}", "private": f"10.120.0.{i + 2}"} for i, h in enumerate(hosts)}
    addresses = tmp_path / "addresses.json"
    addresses.write_text(json.dumps(deployed))
    doc = stack_document("dev")
    doc["config"]["enclave:sshUser"] = "ops"
    stack_file = tmp_path / "Pulumi.dev.yaml"
    stack_file.write_text(yaml.safe_dump(doc))
    config = run_cli(
        tmp_path, capsys, "--stack-file", str(stack_file), "--addresses", str(addresses), "--identity-file", "~/.ssh/dev"
    )
    assert resolved(config, "dev-tunnel-1")["hostname"] == "203.0.113.1"
    mysql = resolved(config, "dev-mysql-1")
    assert (mysql["hostname"], mysql["proxyjump"], mysql["user"]) == ("10.120.0.5", "dev-tunnel-1", "ops")
    assert mysql["identityfile"] == "~/.ssh/dev"


def test_without_a_bastion_every_host_is_direct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc: dict[str, Any] = stack_document("prod")
    roles = doc["config"]["enclave:roles"]
    del roles["tunnel"]
    doc["config"]["enclave:tests"] = []
    stack_file = tmp_path / "Pulumi.flat.yaml"
    stack_file.write_text(yaml.safe_dump(doc))
    config = run_cli(tmp_path, capsys, "--stack-file", str(stack_file))
    text = config.read_text()
    assert "ProxyJump" not in text
    for alias in ("flat-haproxy-www-1", "flat-wordpress-2", "flat-mysql-1"):
        ssh = resolved(config, alias)
        assert ssh["hostname"].startswith("198.18.") and "proxyjump" not in ssh  # public (example) addresses


def test_missing_addresses_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    addresses = tmp_path / "addresses.json"
    addresses.write_text(json.dumps({"tunnel-1": {"public": "203.0.113.1", "private": "10.110.16.2"}}))
    assert main(["ssh-config", "--stack", "prod", "--addresses", str(addresses)]) == 2
    err = capsys.readouterr().err
    assert "--addresses mysql-1" in err and "missing" in err


# ---------------------------------------------------------------------- issue 12: nothing injected, ever


@pytest.mark.parametrize(
    "identity,expected",
    [
        ("/keys/my key", "/keys/my key"),  # a space: quoted, one argument (it broke the whole config)
        ("/keys/#1", "/keys/#1"),  # an unquoted word starting with # would be a comment
        # a literal %, not the %h token (the host name): `ssh -G` prints IdentityFile before expanding tokens,
        # and ssh_config(5) TOKENS expands %% to % when the key is loaded
        ("/keys/100%h", "/keys/100%%h"),
        ("/keys/clé", "/keys/clé"),
    ],
)
def test_identity_file_is_quoted_so_ssh_reads_it_back_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], identity: str, expected: str
) -> None:
    config = run_cli(tmp_path, capsys, "--stack", "prod", "--identity-file", identity)
    assert resolved(config, "prod-mysql-1")["identityfile"] == expected
    assert resolved(config, "prod-tunnel-1")["hostname"] != resolved(config, "prod-mysql-1")["hostname"]


@pytest.mark.parametrize("identity", ["/k\nHost *\n  ProxyCommand touch /tmp/pwned", "/k\rx", '/k"x', "/k\\x", "", "/k\udcff", "/k\u202ex"])
def test_identity_file_that_cannot_be_one_argument_is_refused(capsys: pytest.CaptureFixture[str], identity: str) -> None:
    assert main(["ssh-config", "--stack", "prod", f"--identity-file={identity}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--identity-file" in captured.err and "Traceback" not in captured.err


def test_a_stack_name_with_a_newline_injects_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stack file named `Pulumi.x\nHost *\n  ProxyCommand ….yaml` wrote those lines into the config."""
    path = tmp_path / "Pulumi.x\nHost *\n  ProxyCommand touch pwned.yaml"
    path.write_text(yaml.safe_dump(stack_document("prod")))
    assert main(["ssh-config", "--stack-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "becomes part of droplet host names" in captured.err


def test_every_line_of_the_config_is_one_keyword_and_its_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = run_cli(tmp_path, capsys, "--stack", "prod", "--identity-file", "/keys/a b")
    keywords = {line.split()[0] for line in config.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert keywords == {"Host", "HostName", "User", "IdentityFile", "IdentitiesOnly", "ProxyJump"}
