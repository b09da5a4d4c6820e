"""What the lab needs of this machine: root, the tools, where labs live, and running commands in namespaces."""

from __future__ import annotations

import concurrent.futures
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

NS_PREFIX = "enc-"
LAB_DIR_ENV = "ENCLAVE_LAB_DIR"
LAB_DIR_DEFAULT = Path("/run/enclave-lab")
# A run id names namespaces (enc-<run>-<host>) and a directory under the lab root that `lab down` deletes: letters
# and digits only, so `enclave lab down ..` (or `/`) can never point the deletion outside the lab root.
RUN_ID_FORMAT = re.compile(r"[0-9A-Za-z]{1,32}")
STATE_FILE = "lab.json"
# A push run's runtime directory holds ControlMaster sockets: <dir>/cm-<22 chars> plus ssh's 17-character
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
SSH_USER = "root"  # the push needs root, and the lab's namespaces only know this machine's users

# tool -> the Debian package that provides it (the Makefile's APT_PACKAGES installs them all)
REQUIRED_TOOLS = {
    "ip": "iproute2",
    "iptables-restore": "iptables",
    "ip6tables-restore": "iptables",
    "ipset": "ipset",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sysctl": "procps",
}
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


class LabError(Exception):
    """The lab could not be built or pushed (exit 1: a check that failed)."""


class LabUnavailable(LabError):
    """This machine cannot run a lab (not root, a tool missing): exit 2, with the fix in the message."""



def invoking_user() -> str:
    """Who runs this command: the user behind sudo when there is one (the lab itself always runs as root)."""
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        return sudo
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())



def lab_root() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or LAB_DIR_DEFAULT)


def tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def preflight() -> None:
    if os.geteuid() != 0:
        raise LabUnavailable("the lab builds network namespaces and needs root: run it as root (e.g. sudo make lab)")
    missing = sorted({f"{name} (apt package {package})" for name, package in REQUIRED_TOOLS.items() if not tool(name)})
    if missing:
        raise LabUnavailable(f"missing tools: {', '.join(missing)}; `make setup` as root installs them")
    # The lab's sshd runs without PAM (this machine's login policy is not the droplets'), and without PAM
    # sshd refuses any login to an account whose password field is locked ("!…"), keys included.
    try:
        shadow = Path("/etc/shadow").read_text().splitlines()
    except OSError:
        shadow = []
    if any(line.startswith(f"{SSH_USER}:!") for line in shadow):
        raise LabUnavailable(
            f"{SSH_USER}'s password is locked in /etc/shadow, so the lab's sshd would refuse key logins too; "
            f"`usermod -p '*' {SSH_USER}` allows key logins without allowing any password"
        )


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=input, text=True, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv[:6])}… failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def _run_all(commands: Sequence[tuple[Sequence[str], str | None]], timeout: float = 60,
             check: bool = True) -> list[subprocess.CompletedProcess[str]]:
    """Several commands at once (each with optional stdin); with check, raise on the first that failed."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_run, argv, input=stdin, timeout=timeout, check=check) for argv, stdin in commands]
        return [future.result() for future in futures]
