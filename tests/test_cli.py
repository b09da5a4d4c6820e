"""The `enclave` command line's own edges: version, help, stack naming, refusals that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from enclave.cli import main

from .conftest import stack_document


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
    assert f"pulumi config set --secret {key} <" in err
    assert "notasecret" not in err  # the value is never echoed


def test_plan_accepts_secrets_pulumi_encrypted(tmp_path: Path) -> None:
    path = write_stack(tmp_path / "Pulumi.dev.yaml", {"enclave:sshPrivateKey": {"secure": "v1:AAAA"},
                                                      "digitalocean:token": {"secure": "v1:BBBB"}})
    assert main(["plan", "--stack-file", str(path)]) == 0
