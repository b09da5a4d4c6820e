"""The scripts a host runs: push, confirm, the first-boot baseline and install, each built from enclave/host/.

The host program is POSIX sh in real files, enclave/host/ (shellcheck-clean, tests/unit/test_shellcheck.py), around
one installed helper, `$STATE/apply.sh` (STATE defaults to /var/lib/enclave). This module only prepends a few
shell-quoted values and the rule files (here-documents) to those files' text, so the Pulumi program, the lab and
`enclave audit` send the same bytes. How a push works and the guarantees it keeps under faults are stated once,
in docs/how-a-push-works.md; figures are in docs/benchmarks.md.

The test hook: `checkpoint NAME` in apply.sh is a no-op unless ENCLAVE_TEST_KILL_AT names that step; then the
script (and the push or confirm that called it) dies there as under kill -9. Only the fault-injection tests set it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import re
import shlex

from .rulefiles import RuleFiles

HEREDOC = "ENCLAVE_EOF"
STATE_DIR_DEFAULT = "/var/lib/enclave"
ROLLBACK_SECONDS_DEFAULT = 90
INSTALL_WAIT_DEFAULT = 600  # a first boot's apt-get (unattended-upgrades may hold dpkg's lock for minutes)
UNIT_NAME = "enclave-firewall.service"
STATE = f'STATE="${{ENCLAVE_STATE_DIR:-{STATE_DIR_DEFAULT}}}"'
SSHD_DROP_IN = "enclave.conf"
# Bastions take every operator's and every push's connection on port 22, which only operators may reach; sshd's
# default (10:30:100) starts refusing unauthenticated connections at 10, and pulumi up opens one per host at once.
BASTION_MAX_STARTUPS = "100:30:1000"
# The files of one rule directory, in the order SHA256SUMS lists them.
RULE_DIR_FILES = ("digest", "host", "ipsets", "rules.v4", "rules.v6", "sets")


@functools.lru_cache(maxsize=64)
def digest(files: RuleFiles) -> str:
    """Identifies a host's rules: equal digests, equal rules (the push re-runs exactly when it changes)."""
    h = hashlib.sha256()
    for part in (files.ipv4, files.ipv6, files.ipsets):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def heredoc(path: str, text: str) -> str:
    # The substring test first: it is C-fast, and a line equal to the delimiter contains it (a Python loop over
    # every line cost 3.9 s of 4.2 s when planning 5 000 prod-shaped hosts).
    if HEREDOC in text and HEREDOC in text.splitlines():
        raise ValueError(f"rule text contains the here-document delimiter {HEREDOC}")
    return f"cat > {path} <<'{HEREDOC}'\n{text}{HEREDOC}\n"


def host_files(files: RuleFiles) -> dict[str, str]:
    """The rule directory as it lands on the host: the rendered files as they are (enclave.render names each set
    by its generation), plus `digest`, `host`, `sets` (the set names, one a line) and their SHA256SUMS."""
    out = {
        "digest": digest(files) + "\n",
        "host": files.host + "\n",
        "ipsets": files.ipsets,
        "rules.v4": files.ipv4,
        "rules.v6": files.ipv6,
        "sets": "".join(f"{n}\n" for n in files.set_names),
    }
    sums = "".join(f"{hashlib.sha256(out[name].encode()).hexdigest()}  {name}\n" for name in RULE_DIR_FILES)
    return {**out, "SHA256SUMS": sums}


@functools.cache  # every push script of a plan carries apply.sh: read once
def host_program(name: str) -> str:
    """A file of enclave/host (the host program), as packaged: what lands on the host is these bytes."""
    # bytes, decoded as they are (read_text would translate line endings): apply.sh's checksum is of these bytes
    return (importlib.resources.files("enclave.host") / name).read_bytes().decode()


def _assignments(**values: str | int) -> str:
    """Shell assignments `NAME='value'` (shell-quoted): the only values Python gives the host program's files."""
    return "".join(f"{name}={shlex.quote(str(value))}\n" for name, value in values.items())


def _write_rules_function(function: str, files: RuleFiles) -> str:
    """A shell function `function DIR` that writes one rule directory (mkdir + one here-document per file);
    run in a subshell, it exits non-zero at the first write that fails. Data only: the files' text."""
    out = [f'{function}() {{\nmkdir -p "$1" || exit 1\n']
    for name, text in host_files(files).items():
        cmd, _, body = heredoc(f'"$1/{name}"', text).partition("\n")
        out.append(f"{cmd} || exit 1\n{body}")
    return "".join(out) + "}\n"


@functools.cache
def _apply_sum() -> str:
    return hashlib.sha256(host_program("apply.sh").encode()).hexdigest()


def install_helpers() -> str:
    """Shell that (re)writes apply.sh and, on systemd hosts, the boot unit (enclave/host/install.sh, after
    here-documents of apply.sh and the unit). Same text in push and cloud-init."""
    return (
        'mkdir -p "$STATE" || exit 1\n'
        + _assignments(APPLY_SUM=_apply_sum())
        + heredoc('"$STATE/apply.sh.tmp.$$"', host_program("apply.sh"))
        + heredoc(f'"$STATE/{UNIT_NAME}.tmp.$$"', host_program(UNIT_NAME))
        + host_program("install.sh")
    )


def _key_fields(key: str) -> tuple[str, str]:
    words = key.split()
    if "\n" in key.strip() or len(words) < 2 or not re.fullmatch(r"[A-Za-z0-9+/=]+", words[1]):
        raise ValueError(f"ssh_public_key: not one OpenSSH public key line ({key[:40]!r}…)")
    return words[0], words[1]


def _check_user(ssh_user: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", ssh_user):
        raise ValueError(f"ssh_user: {ssh_user!r} is not a user name")
    return ssh_user


def _key_line(ssh_public_key: str | None) -> str:
    """The key as one normalized line for keys.sh's authorize_key/retire_keys ("" when there is none)."""
    if not ssh_public_key:
        return ""
    _key_fields(ssh_public_key)
    return " ".join(ssh_public_key.split())


def _header(kind: str, stack_name: str, host: str, d: str) -> str:
    return (
        f"#!/bin/sh\n# enclave {kind}: stack {stack_name}, host {host}, rules {d}\nset -u\numask 077\n{STATE}\n"
        + _assignments(ME=f"enclave {kind} {host}: rules {d}")
        + "export ENCLAVE_TOP_PID=$$  # for the test hook (checkpoint in apply.sh) only\n"
    )


def push_script(
    files: RuleFiles,
    stack_name: str,
    *,
    baseline: RuleFiles | None = None,
    ssh_user: str = "root",
    ssh_public_key: str | None = None,
    install_wait_s: int = INSTALL_WAIT_DEFAULT,
) -> str:
    """Prove, arm the rollback, apply (enclave/host/push.sh). Fed to `sh -s` as root on the host; re-run exactly
    when rules change.

    baseline: the role's baseline, refreshed in $STATE/baseline (so a recovery uses the current operators).
    ssh_public_key: made sure to be authorized for ssh_user (appended if missing, never replacing a line).
    install_wait_s: how long the push may wait for the packages a stock image lacks (its own install, or the
    first boot's still running); then a missing command fails the push, one line each, before anything changes.
    """
    return (
        _header("push", stack_name, files.host, digest(files))
        + _assignments(
            HOST=files.host, ROLLBACK_SECONDS=ROLLBACK_SECONDS_DEFAULT, INSTALL_WAIT=int(install_wait_s),
            SSH_USER=_check_user(ssh_user), KEYLINE=_key_line(ssh_public_key), BASELINE="yes" if baseline else "",
        )
        + _write_rules_function("write_rules", files)
        + (_write_rules_function("write_baseline", baseline) if baseline else "")
        + install_helpers()
        + host_program("keys.sh")
        + host_program("push.sh")
    )


def confirm_script(files: RuleFiles, stack_name: str, *, ssh_user: str = "root", ssh_public_key: str | None = None) -> str:
    """Promote the pushed rules to confirmed (enclave/host/confirm.sh). Run over a NEW SSH connection after
    push_script succeeded.

    ssh_public_key: this connection logged in with it, so every other key enclave authorized before is removed
    (key rotation never locks out, and ends with only the new key enclave-managed)."""
    d = digest(files)
    return (
        _header("confirm", stack_name, files.host, d)
        + _assignments(HOST=files.host, DIGEST=d, SSH_USER=_check_user(ssh_user), KEYLINE=_key_line(ssh_public_key))
        + host_program("keys.sh")
        + host_program("confirm.sh")
    )


def baseline_script(files: RuleFiles, *, bastion: bool = False) -> str:
    """First boot (cloud-init bootcmd, every boot): install helpers and baseline, restore confirmed or baseline
    (enclave/host/boot.sh).

    bastion: also raise sshd's MaxStartups (a drop-in in ENCLAVE_SSHD_CONFIG_DIR, default
    /etc/ssh/sshd_config.d; written only there or on the default state directory, so a lab never touches this
    machine's sshd)."""
    return (
        f"#!/bin/sh\n# enclave baseline {files.host}, rules {digest(files)}: closed before any service listens\n"
        f"set -u\numask 077\n{STATE}\n"
        + _assignments(MAX_STARTUPS=BASTION_MAX_STARTUPS if bastion else "", SSHD_DROP_IN=SSHD_DROP_IN)
        + _write_rules_function("write_rules", files)
        + install_helpers()
        + host_program("boot.sh")
    )


def install_script() -> str:
    """cloud-init's runcmd (the final stage, first boot only): install what a stock image lacks, then bring the
    full baseline in force (apply.sh install)."""
    return f'{STATE}\nsh "$STATE/apply.sh" install {INSTALL_WAIT_DEFAULT}\n'


def cloud_config(
    baseline: RuleFiles, *, ssh_user: str = "root", ssh_public_key: str | None = None, bastion: bool = False,
    apt_proxy: str | None = None,
) -> str:
    """Droplet user data: cloud-init runs bootcmd on every boot, early in its init stage, before sshd starts.

    On the first boot that applies the baseline; after a push it restores the last confirmed rules (as the
    systemd unit already did, earlier still). Built from the role's baseline only, never from peers.
    runcmd (the final stage, once per instance: the network is up and apt's sources and proxy are configured)
    installs what a stock image lacks (ipset; iptables on Debian) and then brings the full baseline in force.
    A non-root ssh_user is created with ssh_public_key and passwordless sudo (DigitalOcean installs keys for
    root only); bastions raise sshd's MaxStartups; apt_proxy is apt's proxy for a droplet without a mirror.
    """
    return _cloud_config(baseline, ssh_user, ssh_public_key, bastion, apt_proxy)


# Every droplet of a role boots with the same baseline, and YAML-quoting its script costs about 9 ms: render
# each distinct baseline once (1 000 hosts under mocks spent 9 s here).
@functools.lru_cache(maxsize=256)
def _cloud_config(baseline: RuleFiles, ssh_user: str, ssh_public_key: str | None, bastion: bool,
                  apt_proxy: str | None) -> str:
    import yaml  # here: every push run imports this module and never needs YAML (enclave.rulefiles)

    document: dict[str, object] = {
        "bootcmd": [["sh", "-c", baseline_script(baseline, bastion=bastion)]],
        "runcmd": [["sh", "-c", install_script()]],
    }
    if apt_proxy:
        # cc_apt_configure writes these into /etc/apt/apt.conf.d/90cloud-init-aptproxy before runcmd runs
        document["apt"] = {"http_proxy": apt_proxy, "https_proxy": apt_proxy}
    if ssh_user != "root":
        _check_user(ssh_user)
        user: dict[str, object] = {
            "name": ssh_user,
            "shell": "/bin/bash",
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "lock_passwd": True,
        }
        if ssh_public_key:
            _key_fields(ssh_public_key)
            user["ssh_authorized_keys"] = [" ".join(ssh_public_key.split())]
        # "default" first: a users list replaces the image's own, and root's keys (DigitalOcean's) come with it
        document["users"] = ["default", user]
    return "#cloud-config\n" + yaml.safe_dump(document, default_flow_style=False, width=1 << 16)
