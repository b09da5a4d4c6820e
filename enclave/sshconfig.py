"""An OpenSSH client config so an operator can `ssh prod-mysql-1` on day one: private hosts through the bastion.

The same text is the Pulumi output `sshConfig`, `enclave ssh-config`, and what the lab's operator uses.
"""

from __future__ import annotations

from .compiler import Addresses, Host, Policy


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
    identity_file = identity_file or f"~/.ssh/enclave-{stack_name}"  # one key per stack (DigitalOcean refuses
    jump = jump_host(policy)  # the same public key twice in one account)
    lines = [
        f"# enclave stack {stack_name}: add to ~/.ssh/config (or `Include` it), then `ssh {stack_name}-<host>`.",
        "",
    ]
    for host in policy.hosts:
        alias = f"{stack_name}-{host.name}"
        addr = addresses[host.name]
        direct = jump is None or policy.stack.roles[host.role].bastion
        lines.append(f"Host {alias}")
        lines.append(f"  HostName {addr.public if direct else addr.private}")
        lines.append(f"  User {user}")
        lines.append(f"  IdentityFile {identity_file}")
        lines.append("  IdentitiesOnly yes")
        if not direct and jump is not None:
            lines.append(f"  ProxyJump {stack_name}-{jump.name}")
        lines.extend(f"  {option}" for option in extra_options)
        lines.append("")
    return "\n".join(lines)
