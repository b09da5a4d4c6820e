"""Per host: its rendered rules, the SSH connection that reaches it, and the command that installs them.

Everything about *pushing* a firewall lives here, so a change to how rules reach a host (a second, confirming
command over a new connection, say) is a change to `FirewallPush` alone.

Why a push re-runs exactly when its host's rules change: the push is a `command:remote:Command` with no
`update` command, so Pulumi runs `create` again whenever one of its inputs changes, and its inputs are the
connection (stable: the host's own address, the bastion's address) and `stdin`, the push script, which is
rendered only from the addresses that host's rules actually contain (`RuleFiles.peers`, which the renderer
reports itself, so this can never disagree with the rule logic in enclave.render). Adding a WordPress server
therefore touches the pushes of the hosts that accept from WordPress or send to it, and no other, even in
`pulumi preview`, where a new droplet's addresses are still unknown.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_command import remote

from enclave.compiler import Addresses, Host, Policy
from enclave.plan import example_addresses
from enclave.push import confirm_script, push_script
from enclave.render import Renderer, RuleFiles

# A droplet is "active" in the API a while before its sshd answers (first boot, cloud-init, host keys), and
# pulumi-command gives up after dial_error_limit failed dials (default 10 of 15 s). 30 dials of at most 20 s
# each wait out a slow first boot (several minutes) yet still fail a push to a host that will never answer.
SSH_DIAL_ATTEMPTS = 30
SSH_DIAL_TIMEOUT_SECONDS = 20


# ------------------------------------------------------------------------------------------- rules


class HostRuleFiles:
    """The rule files of every host of one stack, each rendered once the addresses of its rule peers (and
    only those) are known.

    Peers usually come as whole roles (an ipset per source role), so the addresses of a role are joined once
    and shared: a large fleet costs one join per role and host, not one per peer and host.
    """

    def __init__(self, policy: Policy, addresses: dict[str, pulumi.Output[Addresses]], stack_name: str) -> None:
        self.policy = policy
        self.addresses = addresses
        self.stack_name = stack_name
        # Which hosts' addresses each host's rules contain does not depend on the addresses themselves: one
        # render with stand-ins answers it for every host before any droplet exists.
        stand_ins = Renderer(policy, example_addresses(policy), stack_name).render_all()
        self._peers = {name: files.peers for name, files in stand_ins.items()}
        self._role_addresses: dict[str, pulumi.Output[Mapping[str, Any]]] = {}

    def _role(self, role: str) -> pulumi.Output[Mapping[str, Any]]:
        if role not in self._role_addresses:
            hosts = [h.name for h in self.policy.hosts if h.role == role]
            joined = pulumi.Output.all(**{name: self.addresses[name] for name in hosts})
            # A read-only view, not a dict: the SDK walks every dict inside an Output.all looking for nested
            # Outputs, which made each push re-walk its peers' whole address map (1 000 hosts: 84 s -> 39 s).
            self._role_addresses[role] = joined.apply(types.MappingProxyType)
        return self._role_addresses[role]

    def files(self, host: Host) -> pulumi.Output[RuleFiles]:
        policy, stack_name = self.policy, self.stack_name

        def render(parts: list[dict[str, Addresses]]) -> RuleFiles:
            known = {name: address for part in parts for name, address in part.items()}
            return Renderer(policy, known, stack_name).render(host)

        by_role: dict[str, list[str]] = {}
        for name in self._peers[host.name]:
            by_role.setdefault(policy.host_by_name[name].role, []).append(name)
        parts: list[pulumi.Output[Mapping[str, Any]]] = []
        single: list[str] = []
        for role, names in by_role.items():
            if len(names) == policy.stack.roles[role].count:
                parts.append(self._role(role))
            else:
                single += names
        if single:
            parts.append(pulumi.Output.all(**{name: self.addresses[name] for name in single}))
        if not parts:
            return pulumi.Output.from_input(render([]))
        return pulumi.Output.all(*parts).apply(render)


# -------------------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class SshLogin:
    """Who the pushes log in as; the key is a secret Output and stays one inside every connection."""

    user: str
    private_key: pulumi.Output[str]


def bastion_hop(address: pulumi.Input[str], login: SshLogin) -> remote.ProxyConnectionArgs:
    """The jump through the bastion, on its public address."""
    return remote.ProxyConnectionArgs(
        host=address,
        user=login.user,
        private_key=login.private_key,
        dial_error_limit=SSH_DIAL_ATTEMPTS,
        per_dial_timeout=SSH_DIAL_TIMEOUT_SECONDS,
    )


def ssh_connection(
    address: pulumi.Input[str], login: SshLogin, via: remote.ProxyConnectionArgs | None = None
) -> remote.ConnectionArgs:
    """An SSH connection to `address`: a bastion's (or any host's without bastions) public address, or a
    private address reached through `via`."""
    return remote.ConnectionArgs(
        host=address,
        user=login.user,
        private_key=login.private_key,
        proxy=via,
        dial_error_limit=SSH_DIAL_ATTEMPTS,
        per_dial_timeout=SSH_DIAL_TIMEOUT_SECONDS,
    )


# -------------------------------------------------------------------------------------------- push


class FirewallPush(pulumi.ComponentResource):
    """Installs one host's rules over SSH in two commands (enclave/push.py explains the host side):

    `<name>-apply`    validates the rules, arms the host's rollback timer and applies them;
    `<name>-confirm`  runs after it on a NEW SSH connection (pulumi-command dials one per resource): reaching
                      the host again through the new rules is the proof that they keep SSH open. Without it
                      the host rolls back by itself, and this command fails naming the host and the reason.
    Both are `sh -s` with their script on stdin, as root; both scripts change exactly when the rules do.
    The droplet is never replaced for a firewall change: rules are only ever this resource's input.
    """

    apply: remote.Command
    confirm: remote.Command

    def __init__(
        self,
        name: str,
        *,
        connection: remote.ConnectionArgs,
        files: pulumi.Output[RuleFiles],
        stack_name: str,
        user: str,
        after: Sequence[pulumi.Resource] = (),
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("enclave:index:FirewallPush", name, None, opts)
        # The scripts need root; a non-root login (set up by the image or cloud-init) must have sudo.
        shell = "sh -s" if user == "root" else "sudo -n sh -s"
        self.apply = remote.Command(
            f"{name}-apply",
            connection=connection,
            create=shell,
            stdin=files.apply(lambda f: push_script(f, stack_name)),
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(after)),
        )
        self.confirm = remote.Command(
            f"{name}-confirm",
            connection=connection,
            create=shell,
            stdin=files.apply(lambda f: confirm_script(f, stack_name)),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.apply]),
        )
        self.register_outputs({"applied": self.apply.stdout, "confirmed": self.confirm.stdout})
