"""The host program's files (enclave/host) against the Python side: the constants written out in apply.sh, and
what the push installs on a host, byte for byte. No root: the install runs in a temporary state directory."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from config.names import SET_PREFIX
from enclave.push import RULE_DIR_FILES, STATE_DIR_DEFAULT, UNIT_NAME, host_program, install_helpers
from enclave.rulefiles import CHAIN_PREFIX

HOST = Path(__file__).resolve().parent.parent.parent / "enclave" / "host"


def test_apply_sh_spells_the_python_constants() -> None:
    apply_sh = (HOST / "apply.sh").read_text()
    chain_prefixes = set(re.findall(r"\b([A-Z]+)-(?:INPUT|OUTPUT)\b", apply_sh))  # ENCLAVE-INPUT, ENCLAVE-OUTPUT
    assert chain_prefixes == {CHAIN_PREFIX}
    assert f'tmp="{SET_PREFIX}refill-$$"' in apply_sh and f"grep '^{SET_PREFIX}'" in apply_sh
    assert f'= "{" ".join(RULE_DIR_FILES)} " ]' in apply_sh
    assert f'STATE="${{ENCLAVE_STATE_DIR:-{STATE_DIR_DEFAULT}}}"' in apply_sh
    assert f'[ "$STATE" = {STATE_DIR_DEFAULT} ]' in apply_sh  # the sshd drop-in: only on the default state dir
    assert (HOST / UNIT_NAME).is_file() and f"{UNIT_NAME}" in (HOST / "install.sh").read_text()


def test_what_lands_is_byte_identical_to_the_packaged_files(tmp_path: Path) -> None:
    state, units = tmp_path / "state", tmp_path / "units"
    script = f"STATE={state}\n" + install_helpers()
    result = subprocess.run(["sh", "-s"], input=script, text=True, capture_output=True,
                            env={"PATH": "/usr/bin:/bin", "ENCLAVE_SYSTEMD_DIR": str(units)})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    packaged = (HOST / "apply.sh").read_bytes()
    assert (state / "apply.sh").read_bytes() == packaged == host_program("apply.sh").encode()
    assert (state / "apply.sh.sha256").read_text() == f"{hashlib.sha256(packaged).hexdigest()}  apply.sh\n"
    # the unit as packaged, but restoring from this state directory
    unit = (HOST / UNIT_NAME).read_text()
    assert (units / UNIT_NAME).read_text() == unit.replace(
        f"Environment=ENCLAVE_STATE_DIR={STATE_DIR_DEFAULT}\n", f"Environment=ENCLAVE_STATE_DIR={state}\n")
    assert sorted(p.name for p in state.iterdir()) == ["apply.sh", "apply.sh.sha256"]  # no temporary file left


def test_the_host_program_has_no_doubled_braces_left_from_python_strings() -> None:
    for path in HOST.iterdir():
        if path.suffix in (".sh", ".service"):
            assert "{{" not in path.read_text() and "}}" not in path.read_text(), path
