"""What a stack must not carry into `pulumi up`, checked before any resource exists.

Two layers, because the lab and `enclave plan` must keep working with the shipped examples:

- `plaintext_secret_issues`: a stack FILE holding a secret in clear (`enclave:sshPrivateKey`, the previous key,
  `digitalocean:token`). Refused wherever a stack file is read (`enclave plan`, the lab, the program): the file
  is committed, so the secret is already in git history once anything reads it.
- `deployment_issues`: what only a real deployment cannot use, refused by the Pulumi program alone: the shipped
  placeholder public key, operator addresses in the documentation ranges (nobody's address: the bastion would
  admit no one and every push would wait out its deadline), and a public key that is not the private key's
  (every droplet would be created with a key nobody holds).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .schema import NAMESPACE, StackConfig, StackIssue

# pulumi config set --secret writes `key: {secure: v1:...}`; anything else under these keys is clear text. Each
# with the command that stores it encrypted, reading the value from stdin (never on a command line: shell history).
SECRET_CONFIG_KEYS = {
    f"{NAMESPACE}:sshPrivateKey": f"`pulumi config set --secret {NAMESPACE}:sshPrivateKey < ~/.ssh/enclave-<stack>`",
    f"{NAMESPACE}:sshPreviousPrivateKey":
        f"`pulumi config set --secret {NAMESPACE}:sshPreviousPrivateKey < ~/.ssh/enclave-<stack>.old`",
    "digitalocean:token": "`pulumi config set --secret digitalocean:token` (no value: it reads the token from stdin), "
                          "or leave it out of the stack and export DIGITALOCEAN_TOKEN",
}

# RFC 5737 / RFC 3849: addresses reserved for examples, never anyone's machine
DOCUMENTATION_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
# The shipped stacks' public keys are ed25519 blobs spelling "enclave-example-key-not-real-NNN"
PLACEHOLDER_KEY_MARK = b"example-key-not-real"


def plaintext_secret_issues(config: dict[str, Any]) -> list[StackIssue]:
    """The secret keys a stack file's `config:` map holds in clear text (their values are never echoed)."""
    issues = []
    for key, fix in SECRET_CONFIG_KEYS.items():
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, dict) and set(value) == {"secure"}:
            continue
        issues.append(StackIssue(key, (
            f"is in plain text in the stack file, which is committed: delete the line, then store it encrypted with "
            f"{fix} (and rotate it if the file was ever pushed)")))
    return issues


def _key_blob(public_key: str) -> tuple[str, bytes] | None:
    parts = public_key.split()
    if len(parts) < 2:
        return None
    try:
        return parts[0], base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return None


def derived_public_key(private_key: str) -> str:
    """`ssh-keygen -y` of the key (type and base64 blob), or ValueError saying why it cannot be derived."""
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise ValueError("ssh-keygen is not on PATH (install openssh-client: the pushes need ssh too)")
    with tempfile.TemporaryDirectory(prefix="enclave-key-") as directory:  # 0700, removed at once
        path = Path(directory) / "key"
        path.touch(mode=0o600)
        path.write_text(private_key.strip() + "\n")
        done = subprocess.run([keygen, "-y", "-P", "", "-f", str(path)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=30)
    if done.returncode != 0:
        raise ValueError("ssh-keygen cannot read it (a key with a passphrase? the pushes run unattended: "
                         "use a key without one)")
    return " ".join(done.stdout.split()[:2])


def deployment_issues(stack_name: str, config: StackConfig, private_key: str | None) -> list[StackIssue]:
    """What makes a valid stack unfit to deploy (module docstring); private_key None: not checked here."""
    issues = []
    set_public = (f'`ssh-keygen -t ed25519 -N "" -f ~/.ssh/enclave-{stack_name}`, then `pulumi config set '
                  f'{NAMESPACE}:sshPublicKey "$(cat ~/.ssh/enclave-{stack_name}.pub)"` and `pulumi config set '
                  f'--secret {NAMESPACE}:sshPrivateKey < ~/.ssh/enclave-{stack_name}`')
    blob = _key_blob(config.ssh_public_key)
    placeholder = blob is not None and PLACEHOLDER_KEY_MARK in blob[1]
    if placeholder:
        issues.append(StackIssue(f"{NAMESPACE}:sshPublicKey", f"is the shipped example key, which nobody holds: {set_public}"))
    for net in config.operators:
        if any(net.version == doc.version and net.subnet_of(doc) for doc in DOCUMENTATION_NETWORKS):  # type: ignore[arg-type]
            issues.append(StackIssue(f"{NAMESPACE}:operators", (
                f"{net} is a documentation address (RFC 5737/3849), nobody's machine: the bastion would admit no "
                f"one; put the address you SSH from (`curl -4 ifconfig.me`), e.g. `pulumi config set --path "
                f"'{NAMESPACE}:operators[0]' <your-ip>/32`")))
    if private_key is not None and not placeholder:
        try:
            derived = derived_public_key(private_key)
        except ValueError as exc:
            issues.append(StackIssue(f"{NAMESPACE}:sshPrivateKey", f"its public key cannot be derived: {exc}"))
        else:
            if " ".join(config.ssh_public_key.split()[:2]) != derived:
                issues.append(StackIssue(f"{NAMESPACE}:sshPublicKey", (
                    "is not the public key of enclave:sshPrivateKey (`ssh-keygen -y -f ~/.ssh/enclave-"
                    f"{stack_name}` prints the right one): the droplets would authorize a key the pushes do not "
                    f"hold; {set_public}")))
    return issues
