"""`enclave prove`, `explain` and `reach` as a user runs them: outputs, exit codes, and bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.stackfile import load_stack
from enclave.cli import main
from enclave.plan import build_plan


def test_prove_prod_proves_every_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prove", "--stack", "prod"]) == 0
    out = capsys.readouterr().out
    assert "stack prod: all 6 hosts proved equal to the policy for every packet" in out
    assert "mysql-2: proved" in out and "(same files as a host above)" in out


def write_rules(root: Path, host: str, v4: str | None = None) -> None:
    files = build_plan(load_stack("prod")).files[host]
    (root / host).mkdir(parents=True)
    (root / host / "rules.v4").write_text(v4 if v4 is not None else files.ipv4)
    (root / host / "rules.v6").write_text(files.ipv6)
    (root / host / "ipsets").write_text(files.ipsets)


def test_prove_rules_dir_gives_the_counterexample_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v4 = build_plan(load_stack("prod")).files["mysql-1"].ipv4.replace("--dport 3306", "--dport 3300:3310")
    write_rules(tmp_path, "mysql-1", v4)
    assert main(["prove", "--stack", "prod", "--rules", str(tmp_path), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    (host,) = report["hosts"]
    assert host["host"] == "mysql-1" and not host["proved"]
    first = host["counterexamples"][0]
    assert first["rules"] == "ACCEPT" and first["policy"] == "deny" and first["ruleLine"] == 15
    assert first["comment"] == "roles.mysql.ingress[0]: wordpress -> tcp/3306"
    assert "tcp/3300 NEW" in first["packet"] and "10.110.16.4 (wordpress-1)" in first["packet"]


def test_prove_rules_dir_as_rendered_is_proved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_rules(tmp_path, "wordpress-2")
    assert main(["prove", "--stack", "prod", "--rules", str(tmp_path)]) == 0
    assert "all 1 hosts proved" in capsys.readouterr().out


def test_prove_refuses_an_unmodelled_rule_naming_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v4 = build_plan(load_stack("prod")).files["mysql-1"].ipv4.replace("-i lo -j ACCEPT", "-i lo -m recent -j ACCEPT")
    write_rules(tmp_path, "mysql-1", v4)
    assert main(["prove", "--stack", "prod", "--rules", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/mysql-1/rules.v4: line 11: match module 'recent' is not modelled" in err.replace("\n", "")


def test_prove_rules_dir_without_hosts_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prove", "--stack", "prod", "--rules", str(tmp_path)]) == 2
    assert "--rules" in capsys.readouterr().err


def test_explain_names_the_declaration_and_the_rule_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--stack", "prod", "wordpress-1", "mysql-1", "tcp/3306"]) == 0
    out = capsys.readouterr().out
    assert "wordpress-1 -> mysql-1 tcp/3306: allow" in out
    assert "declaration: roles.mysql.ingress[0]" in out
    assert "mysql-1 rules.v4 line 15: -A ENCLAVE-INPUT -i eth1 -p tcp -m tcp --dport 3306" in out


def test_explain_a_denied_packet_shows_the_default_drop(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--stack", "prod", "internet", "mysql-1", "tcp/22", "--format", "json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert (e["verdict"], e["declaration"], e["rules"], e["agrees"]) == ("deny", "default drop", "DROP", True)
    assert e["rule"].endswith('--comment "default drop" -j DROP')


@pytest.mark.parametrize(("argv", "key"), [
    (["nobody", "mysql-1", "tcp/22"], "SRC"),
    (["internet", "mysql-9", "tcp/22"], "DST"),
    (["internet", "mysql-1", "tcp/1-9"], "PORT"),
])
def test_explain_bad_input_names_the_argument(argv: list[str], key: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--stack", "prod", *argv]) == 2
    assert key in capsys.readouterr().err


def test_reach_lists_what_a_compromised_host_opens(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reach", "--stack", "prod", "wordpress-1"]) == 0
    out = capsys.readouterr().out
    assert "mysql [mysql-1, mysql-2] via private: tcp/3306 (roles.mysql.ingress[0])" in out
    assert "wordpress [wordpress-2] via private: tcp/24007-24008" in out
    assert "haproxy-www [haproxy-www-1] via public: tcp/80" in out
    assert "tunnel" not in out  # nobody but operators reaches the bastion


def test_reach_json_for_the_balancer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reach", "--stack", "prod", "haproxy-www-1", "--format", "json"]) == 0
    reaches = json.loads(capsys.readouterr().out)["reaches"]
    assert reaches == [{"role": "wordpress", "hosts": ["wordpress-1", "wordpress-2"], "port": "tcp/80",
                        "interface": "private", "why": "roles.wordpress.ingress[0]"}]


def test_prove_a_fleet_prints_a_summary_not_a_line_per_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from benchmarks.fleet import prod_shaped

    values = prod_shaped(200)
    path = tmp_path / "Pulumi.fleet.yaml"
    path.write_text(yaml.safe_dump({"config": {f"enclave:{k}": v for k, v in values.items()}}))
    assert main(["prove", "--stack-file", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stack fleet: all 200 hosts proved equal to the policy for every packet")
    assert "4 distinct file sets" in out and len(out.splitlines()) == 1
