"""An OpenSSH client config so an operator can `ssh prod-mysql-1` on day one: private hosts through the bastion.

The same text is the Pulumi output `sshConfig`, `enclave ssh-config`, and what the lab's operator uses.

For users: docs/cli.md#ssh-config.
"""

from __future__ import annotations

import re

from .compiler import Addresses, Host, Policy

# ssh_config(5): a line is `keyword arguments`, arguments split on whitespace and "may optionally be enclosed in
# double quotes (\") in order to represent arguments containing spaces"; an unquoted word starting with `#`
# begins a comment; IdentityFile expands `%` tokens (`%%` is a literal %) and `~`. No escape for `"` is
# documented (newer clients read backslash escapes, older ones do not), and a line ends at a newline. So an
# argument is written bare when it holds only these characters, in double quotes otherwise, and refused when
# it holds a double quote, a backslash or a character that is not printable (a newline would start a new,
# injected line).
BARE_ARGUMENT = re.compile(r"[A-Za-z0-9_.,/~@:+=%-]+")


class SshConfigError(ValueError):
    """A value that cannot be written into an ssh config as itself."""


def ssh_config_argument(value: str, what: str, tokens: bool = False) -> str:
    """`value` as one ssh_config argument, quoted if need be; `tokens`: the keyword expands `%` (IdentityFile)."""
    # not printable: control characters (a newline would start an injected line), bytes that were not UTF-8
    # (surrogate escapes, which a UTF-8 terminal cannot even print), invisible format characters
    refused = next((c for c in value if not c.isprintable() or c in '"\\'), None)
    if not value or refused is not None:
        why = "is empty" if not value else f"holds {refused!r}, which an ssh config cannot carry in one argument"
        raise SshConfigError(f"{what} {why}; use a path without quotes, backslashes or control characters")
    if tokens:
        value = value.replace("%", "%%")  # a literal %, not the start of a token like %h
    return value if BARE_ARGUMENT.fullmatch(value) else f'"{value}"'


def jump_host(policy: Policy) -> Host | None:
    """The bastion every other host is reached through (the first bastion host), or None without bastions."""
    bastions = policy.bastion_hosts()
    return bastions[0] if bastions else None


def ssh_config(
    stack_name: str,
    policy: Policy,
    addresses: dict[str, Addresses],
    user: str,
    identity_file: str | None = None,
    extra_options: tuple[str, ...] = (),
) -> str:
    """`Host <stack>-<host>` blocks: bastions and bastion-less stacks on public addresses, the rest via ProxyJump."""
    # one key per stack (DigitalOcean refuses the same public key twice in one account)
    default = f"~/.ssh/enclave-{stack_name}"
    identity = ssh_config_argument(default if identity_file is None else identity_file, "--identity-file", tokens=True)
    # stack, host and user names are validated hostnames and user names; checked again so no caller can inject
    ssh_config_argument(stack_name, "the stack name")
    user = ssh_config_argument(user, "sshUser")
    jump = jump_host(policy)
    lines = [
        f"# enclave stack {stack_name}: add to ~/.ssh/config (or `Include` it), then `ssh {stack_name}-<host>`.",
        "",
    ]
    for host in policy.hosts:
        alias = f"{stack_name}-{host.name}"
        addr = addresses[host.name]
        direct = jump is None or policy.stack.roles[host.role].bastion
        lines.append(f"Host {alias}")
        lines.append(f"  HostName {ssh_config_argument(addr.require_public(host.name) if direct else addr.private, host.name + ' address')}")
        lines.append(f"  User {user}")
        lines.append(f"  IdentityFile {identity}")
        lines.append("  IdentitiesOnly yes")
        if not direct and jump is not None:
            lines.append(f"  ProxyJump {stack_name}-{jump.name}")
        lines.extend(f"  {option}" for option in extra_options)
        lines.append("")
    return "\n".join(lines)
