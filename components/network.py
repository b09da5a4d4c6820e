"""`EnclaveNetwork`: everything one stack creates, and why.

    enclave:index:EnclaveNetwork  <stack>
    ├── digitalocean:Vpc              enclave-<stack>     the private network (vpcIpRange); peers talk only here
    ├── digitalocean:SshKey           enclave-<stack>     sshPublicKey, installed on every droplet at creation
    ├── digitalocean:Droplet          <stack>-<role>-<n>  one per host, in the VPC, tagged enclave, enclave-<stack>,
    │                                                     enclave-<stack>-<role> and the role's own tags
    ├── enclave:index:FirewallPush    <stack>-<role>-<n>  one per host: its rules, pushed over SSH
    │   ├── command:remote:Command    <stack>-<role>-<n>-apply    validate, arm rollback, apply
    │   └── command:remote:Command    <stack>-<role>-<n>-confirm  new SSH connection: keep the rules
    └── digitalocean:Firewall         enclave-<stack>-<role>  only with enclave:cloudFirewall: true, one per role
                                                          (components/cloud_firewall.py)

Scaling is additive: a droplet's inputs come from its role alone (never from its peers), so adding a host
changes no existing droplet, and removing one removes the highest-numbered. Firewall changes only ever touch
FirewallPush resources. Droplets boot closed: their user data (cloud-init) applies the role's baseline, which
depends on no peer. Bastions are pushed and confirmed first, on their public address; every other host is pushed on its
private address through the first bastion (the one `ssh_config` jumps through), or on its public address when
the stack has no bastion.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pulumi
import pulumi_digitalocean as digitalocean
from pulumi_command import remote

from enclave.cloudfirewall import role_tag
from enclave.compiler import Addresses, Host
from enclave.plan import droplet_name
from enclave.push import cloud_config
from enclave.render import baseline_files
from enclave.sshconfig import jump_host, ssh_config

from .cloud_firewall import role_firewalls
from .firewall import FirewallPush, HostRuleFiles, SshLogin, bastion_hop, ssh_connection
from .stack_config import StackSettings

TAG = "enclave"


def host_tags(stack_name: str, role: str, extra: list[str]) -> list[str]:
    # The DigitalOcean API creates missing tags when a droplet is created with them, so no Tag resources:
    # a shared tag like `enclave` would otherwise belong to whichever stack created it first.
    # role_tag: the tag cloud firewalls select a role's droplets by.
    return [TAG, f"{TAG}-{stack_name}", role_tag(stack_name, role), *extra]


def _addresses(droplet: digitalocean.Droplet, ipv6: bool) -> pulumi.Output[Addresses]:
    parts = [droplet.ipv4_address, droplet.ipv4_address_private] + ([droplet.ipv6_address] if ipv6 else [])

    def make(values: list[Any]) -> Addresses:
        return Addresses(public=values[0], private=values[1], public6=(values[2] or None) if ipv6 else None)

    return pulumi.Output.all(*parts).apply(make)


class EnclaveNetwork(pulumi.ComponentResource):
    """One stack: a VPC, its droplets and each droplet's firewall (see the module docstring for the tree)."""

    hosts: pulumi.Output[dict[str, dict[str, str | None]]]
    bastion: pulumi.Output[str | None]
    ssh_config: pulumi.Output[str]
    flows: list[dict[str, Any]]

    def __init__(self, settings: StackSettings, opts: pulumi.ResourceOptions | None = None) -> None:
        name = settings.name
        super().__init__("enclave:index:EnclaveNetwork", name, None, opts)
        stack = settings.config
        policy = settings.plan.policy
        child = pulumi.ResourceOptions(parent=self)

        self.vpc = digitalocean.Vpc(
            f"{TAG}-{name}", name=f"{TAG}-{name}", region=stack.region, ip_range=str(stack.vpc_ip_range), opts=child
        )
        self.ssh_key = digitalocean.SshKey(
            f"{TAG}-{name}", name=f"{TAG}-{name}", public_key=stack.ssh_public_key, opts=child
        )

        self.droplets: dict[str, digitalocean.Droplet] = {}
        addresses: dict[str, pulumi.Output[Addresses]] = {}
        for host in policy.hosts:
            role = stack.roles[host.role]
            droplet = digitalocean.Droplet(
                droplet_name(name, host),
                name=droplet_name(name, host),
                region=stack.region,
                image=role.image or stack.image,
                size=role.size,
                vpc_uuid=self.vpc.id,
                ipv6=role.ipv6,
                ssh_keys=[self.ssh_key.fingerprint],
                tags=host_tags(name, host.role, role.tags),
                user_data=cloud_config(baseline_files(stack, host.role)),
                opts=pulumi.ResourceOptions(
                    parent=self,
                    # user_data: the first-boot baseline (cloud-init) never depends on peers, and a change to it
                    # must not rebuild running servers; it applies to droplets created after the change.
                    # ssh_keys: DigitalOcean only installs keys at creation; rotating sshPublicKey must not
                    # replace (wipe) every droplet either.
                    ignore_changes=["user_data", "ssh_keys"],
                ),
            )
            self.droplets[host.name] = droplet
            addresses[host.name] = _addresses(droplet, role.ipv6)

        self.pushes = self._push_firewalls(settings, addresses)
        self.cloud_firewalls = role_firewalls(settings.cloud_firewalls, self.droplets, parent=self)

        jump = jump_host(policy)
        all_addresses = pulumi.Output.all(**addresses)
        self.hosts = all_addresses.apply(
            lambda known: {
                h.name: {"role": h.role, "droplet": droplet_name(name, h), **asdict(known[h.name])} for h in policy.hosts
            }
        )
        self.bastion = addresses[jump.name].apply(lambda a: a.public) if jump else pulumi.Output.from_input(None)
        self.ssh_config = all_addresses.apply(
            lambda known: ssh_config(name, policy, known, stack.ssh_user, identity_file=f"~/.ssh/{TAG}-{name}")
        )
        self.flows = settings.plan.to_json()["flows"]
        self.register_outputs(
            {"hosts": self.hosts, "bastion": self.bastion, "sshConfig": self.ssh_config, "flows": self.flows}
        )

    def _push_firewalls(
        self, settings: StackSettings, addresses: dict[str, pulumi.Output[Addresses]]
    ) -> dict[str, FirewallPush]:
        """One FirewallPush per host; bastions first, everyone else through the jump host."""
        policy = settings.plan.policy
        login = SshLogin(settings.config.ssh_user, settings.ssh_private_key)
        jump = jump_host(policy)
        bastions = policy.bastion_hosts()
        others = [h for h in policy.hosts if h not in bastions]
        pushes: dict[str, FirewallPush] = {}
        rules = HostRuleFiles(policy, addresses, settings.name)

        def push(host: Host, connection: remote.ConnectionArgs, after: list[pulumi.Resource]) -> None:
            pushes[host.name] = FirewallPush(
                droplet_name(settings.name, host),
                connection=connection,
                files=rules.files(host),
                stack_name=settings.name,
                user=login.user,
                after=after,
                opts=pulumi.ResourceOptions(parent=self),
            )

        for host in bastions:
            push(host, ssh_connection(addresses[host.name].apply(lambda a: a.public), login), [])
        via = bastion_hop(addresses[jump.name].apply(lambda a: a.public), login) if jump else None
        for host in others:
            address = addresses[host.name].apply(lambda a: a.private if jump else a.public)
            push(host, ssh_connection(address, login, via), [pushes[jump.name]] if jump else [])
        return pushes
