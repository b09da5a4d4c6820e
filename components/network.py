"""`EnclaveNetwork`: everything one stack creates, and why.

    enclave:index:EnclaveNetwork  <stack>
    ├── digitalocean:Vpc              enclave-<stack>     the private network (vpcIpRange); peers talk only here
    ├── digitalocean:SshKey           enclave-<stack>     sshPublicKey, installed on every droplet at creation
    ├── digitalocean:VpcNatGateway    enclave-<stack>     only when a role has `public: false` (and natGateway is
    │                                                     not false): the VPC's default gateway, created before
    │                                                     the droplets, so private droplets reach the Internet
    ├── digitalocean:Droplet          <stack>-<role>-<n>  one per host, in the VPC, tagged enclave, enclave-<stack>,
    │                                                     enclave-<stack>-<role> and the role's own tags;
    │                                                     `public: false` roles without public networking
    ├── digitalocean:ReservedIp       <stack>-<role>-<n>-ip  one per bastion host, assigned to it: the address
    │                                                     operators and pushes dial, kept when the bastion is replaced
    ├── command:local:Command         <stack>-<role>-<n>-push  one per host: `.venv/bin/python -m enclave.pushrun`
    │                                                     pushes its rules over SSH and confirms them over a new
    │                                                     connection, in one run (components/firewall.py)
    └── digitalocean:Firewall         enclave-<stack>-<role>  only with enclave:cloudFirewall: true, one per role
                                                          (components/cloud_firewall.py)

Scaling is additive: a droplet's inputs come from its role alone (never from its peers), so adding a host
changes no existing droplet, and removing one removes the highest-numbered. Firewall changes only ever touch
push commands. Droplets boot closed: their user data (cloud-init) applies the role's baseline, which depends on
no peer. Bastions are pushed and confirmed first, on their droplet's own public address (operators get the
reserved IP); every other host's push waits for every bastion's and goes to its private address through the
bastions (the first one, which `ssh_config` jumps through, preferred), or to its public address when the stack
has no bastion. Droplets of a role with `public: false` have no public address and always go through bastions.

A push's URN, which `enclave audit` prints in `pulumi up --target` commands, is
`urn:pulumi:<stack>::enclave::enclave:index:EnclaveNetwork$command:local:Command::<stack>-<role>-<n>-push`
(`enclave.resource_names.push_urn`, which audit prints and tests/unit/test_program.py checks); keep the names stable.

For users: docs/operations.md (what `pulumi up` creates, scaling).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import pulumi
import pulumi_digitalocean as digitalocean
from pulumi_command import local

from config.schema import StackConfig
from enclave.cloudfirewall import role_tag
from enclave.compiler import Addresses, Host
from enclave.plan import droplet_name
from enclave.push import cloud_config
from enclave.pushrun import ENV_PREVIOUS_PRIVATE_KEY, ENV_PRIVATE_KEY, PushRequest
from enclave.render import RuleFiles, baseline_files
from enclave.resource_names import NETWORK_TYPE
from enclave.sshconfig import jump_host, ssh_config

from .cloud_firewall import role_firewalls
from .firewall import HostRuleFiles, push_command, push_request
from .stack_config import StackSettings

TAG = "enclave"


def host_tags(stack_name: str, role: str, extra: list[str]) -> list[str]:
    # The DigitalOcean API creates missing tags when a droplet is created with them, so no Tag resources:
    # a shared tag like `enclave` would otherwise belong to whichever stack created it first.
    # role_tag: the tag cloud firewalls select a role's droplets by.
    return [TAG, f"{TAG}-{stack_name}", role_tag(stack_name, role), *extra]


def user_data(stack: StackConfig, role: str) -> str:
    """A droplet's cloud-init: the role's baseline (never a peer), so it never changes when the fleet does; a
    non-root `sshUser` created with the stack's key and passwordless sudo (DigitalOcean installs keys for root
    only); on bastions, sshd's MaxStartups raised for the pushes that all arrive at once."""
    return cloud_config(
        baseline_files(stack, role),
        ssh_user=stack.ssh_user,
        ssh_public_key=stack.ssh_public_key,
        bastion=stack.roles[role].bastion,
        apt_proxy=stack.apt_proxy,
    )


def _addresses(droplet: digitalocean.Droplet, ipv6: bool, reserved: digitalocean.ReservedIp | None = None
               ) -> pulumi.Output[Addresses]:
    """A droplet's addresses as operators use them (`hosts`, `bastion`, `sshConfig`): a bastion's public address
    is its reserved IP, known once it is assigned to this droplet; a droplet without public networking has none
    (the provider says ""). The pushes dial a bastion on its droplet's own address (`_push_firewalls` says why)."""
    public: pulumi.Output[Any] = droplet.ipv4_address
    if reserved is not None:
        public = pulumi.Output.all(reserved.ip_address, reserved.droplet_id).apply(lambda v: v[0])
    parts = [public, droplet.ipv4_address_private] + ([droplet.ipv6_address] if ipv6 else [])

    def make(values: list[Any]) -> Addresses:
        return Addresses(public=values[0] or None, private=values[1], public6=(values[2] or None) if ipv6 else None)

    return pulumi.Output.all(*parts).apply(make)


def _public(host: Host, addresses: Mapping[str, pulumi.Output[Addresses]]) -> pulumi.Output[str]:
    return addresses[host.name].apply(lambda a: a.require_public(host.name))


def nat_gateway(stack: StackConfig, name: str, vpc: digitalocean.Vpc, parent: pulumi.Resource
                ) -> digitalocean.VpcNatGateway | None:
    """The VPC's NAT gateway, when the stack has private roles and did not opt out (`natGateway: false`).

    `default_gateway: True` makes it the VPC's default route, which is what gives droplets without public
    networking their outbound Internet with no configuration on the droplet (DigitalOcean, "Private Droplets":
    "Automatic outbound internet connectivity when the NAT gateway is configured as the default route for the
    VPC"). It is set at creation only: the provider never sends `vpcs` on update (docs/operations.md)."""
    gateway = stack.nat_gateway
    if gateway is None or not stack.uses_nat_gateway():
        return None
    return digitalocean.VpcNatGateway(
        f"{TAG}-{name}",
        name=f"{TAG}-{name}",
        type="PUBLIC",
        region=stack.region,
        size=gateway.size,
        vpcs=[digitalocean.VpcNatGatewayVpcArgs(vpc_uuid=vpc.id, default_gateway=True)],
        tcp_timeout_seconds=gateway.tcp_timeout_seconds,
        udp_timeout_seconds=gateway.udp_timeout_seconds,
        icmp_timeout_seconds=gateway.icmp_timeout_seconds,
        opts=pulumi.ResourceOptions(parent=parent),
    )


class EnclaveNetwork(pulumi.ComponentResource):
    """One stack: a VPC, its droplets and each droplet's firewall (see the module docstring for the tree)."""

    hosts: pulumi.Output[dict[str, dict[str, str | None]]]
    bastion: pulumi.Output[str | None]
    ssh_config: pulumi.Output[str]
    flows: list[dict[str, Any]]

    def __init__(self, settings: StackSettings, opts: pulumi.ResourceOptions | None = None) -> None:
        name = settings.name
        super().__init__(NETWORK_TYPE, name, None, opts)
        stack = settings.config
        policy = settings.plan.policy
        child = pulumi.ResourceOptions(parent=self)

        self.vpc = digitalocean.Vpc(
            f"{TAG}-{name}", name=f"{TAG}-{name}", region=stack.region, ip_range=str(stack.vpc_ip_range), opts=child
        )
        self.ssh_key = digitalocean.SshKey(
            f"{TAG}-{name}", name=f"{TAG}-{name}", public_key=stack.ssh_public_key, opts=child
        )

        self.nat_gateway = nat_gateway(stack, name, self.vpc, self)
        self.droplets: dict[str, digitalocean.Droplet] = {}
        self.reserved_ips: dict[str, digitalocean.ReservedIp] = {}
        addresses: dict[str, pulumi.Output[Addresses]] = {}
        for host in policy.hosts:
            role = stack.roles[host.role]
            # a private droplet boots into a VPC whose default route must already be the gateway: its first boot
            # installs packages through it
            after = [self.nat_gateway] if self.nat_gateway is not None and not role.public else []
            droplet = digitalocean.Droplet(
                droplet_name(name, host),
                name=droplet_name(name, host),
                region=stack.region,
                image=role.image or stack.image,
                size=role.size,
                vpc_uuid=self.vpc.id,
                ipv6=role.ipv6,
                # only ever false: public roles leave it to the provider's default, as before this key existed
                public_networking=None if role.public else False,
                ssh_keys=[self.ssh_key.fingerprint],
                tags=host_tags(name, host.role, role.tags),
                user_data=user_data(stack, host.role),
                opts=pulumi.ResourceOptions(
                    parent=self,
                    # user_data: the first-boot baseline (cloud-init) never depends on peers, and a change to it
                    # must not rebuild running servers; it applies to droplets created after the change.
                    # ssh_keys: DigitalOcean only installs keys at creation; rotating sshPublicKey must not
                    # replace (wipe) every droplet either.
                    ignore_changes=["user_data", "ssh_keys"],
                    depends_on=after,
                ),
            )
            self.droplets[host.name] = droplet
            if role.bastion:
                # droplet_id is not ForceNew in the provider: a replaced bastion's address moves to the new droplet
                self.reserved_ips[host.name] = digitalocean.ReservedIp(
                    f"{droplet_name(name, host)}-ip",
                    region=stack.region,
                    droplet_id=droplet.id.apply(int),
                    opts=child,
                )
            addresses[host.name] = _addresses(droplet, role.ipv6, self.reserved_ips.get(host.name))

        self.pushes = self._push_firewalls(settings, addresses)
        self.cloud_firewalls = role_firewalls(settings.cloud_firewalls, self.droplets, parent=self)

        jump = jump_host(policy)
        all_addresses = pulumi.Output.all(**addresses)
        self.hosts = all_addresses.apply(
            lambda known: {
                h.name: {"role": h.role, "droplet": droplet_name(name, h), **asdict(known[h.name])} for h in policy.hosts
            }
        )
        self.bastion = _public(jump, addresses) if jump else pulumi.Output.from_input(None)
        self.ssh_config = all_addresses.apply(
            lambda known: ssh_config(name, policy, known, stack.ssh_user, identity_file=f"~/.ssh/{TAG}-{name}")
        )
        self.flows = settings.plan.to_json()["flows"]
        self.register_outputs(
            {"hosts": self.hosts, "bastion": self.bastion, "sshConfig": self.ssh_config, "flows": self.flows}
        )

    def _push_firewalls(
        self, settings: StackSettings, addresses: dict[str, pulumi.Output[Addresses]]
    ) -> dict[str, local.Command]:
        """One push per host; bastions first, every other host after all of them, through them."""
        stack = settings.config
        policy = settings.plan.policy
        bastions = policy.bastion_hosts()
        rules = HostRuleFiles(policy, addresses, settings.name, settings.plan.files)
        # A bastion is dialed on its droplet's own public address, not its reserved IP: when a bastion is replaced,
        # the reserved IP moves to the new droplet before the other hosts are pushed, and they admit only the old
        # one until their push lands. The previous run's "via" (pushrun's fallback) must still reach the old
        # droplet, which stays until the update ends; and a new droplet on a new address is a new known_hosts
        # entry (accept-new), where the same reserved IP with a new host key would be refused as changed.
        own = {b.name: self.droplets[b.name].ipv4_address for b in bastions}
        # Jump hosts in preference order: the first bastion (the one `ssh_config` jumps through) first, so
        # pushrun dials through it and falls back to the others (and to the one in PULUMI_COMMAND_STDOUT).
        jumps = [own[b.name] for b in bastions]
        environment = self._push_environment(settings)
        baselines = {role: baseline_files(stack, role) for role in stack.roles}
        pushes: dict[str, local.Command] = {}

        def push(host: Host, address: pulumi.Output[str], via: list[pulumi.Output[str]], after: list[local.Command]) -> None:
            baseline = baselines[host.role]

            def request(files: RuleFiles, dial: str, jump_addresses: tuple[str, ...]) -> PushRequest:
                return PushRequest(
                    stack=settings.name,
                    host=host.name,
                    user=stack.ssh_user,
                    address=dial,
                    bastions=jump_addresses,
                    files=files,
                    baseline=baseline,
                    public_key=stack.ssh_public_key,
                    deadline_s=stack.push_timeout,
                    repush=stack.repush.get(host.name, 0),
                )

            droplet = droplet_name(settings.name, host)
            pushes[host.name] = push_command(
                droplet,
                request=push_request(request, rules.files(host), address, via),
                environment=environment,
                after=after,
                parent=self,
            )

        for host in bastions:
            push(host, own[host.name], [], [])
        bastion_pushes = [pushes[b.name] for b in bastions]
        for host in policy.hosts:
            if host.name not in pushes:
                address = (addresses[host.name].apply(lambda a: a.private) if bastions
                           else _public(host, addresses))
                push(host, address, jumps, bastion_pushes)
        return pushes

    @staticmethod
    def _push_environment(settings: StackSettings) -> pulumi.Output[Mapping[str, str]]:
        """The pushes' environment: the private key (and, while rotating, the previous one), one secret."""
        keys: dict[str, pulumi.Input[str]] = {ENV_PRIVATE_KEY: settings.ssh_private_key}
        if settings.ssh_previous_private_key is not None:
            keys[ENV_PREVIOUS_PRIVATE_KEY] = settings.ssh_previous_private_key
        return pulumi.Output.secret(pulumi.Output.all(**keys).apply(lambda env: dict(env)))
