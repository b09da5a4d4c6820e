"""`enclave:cloudFirewall: true`: a DigitalOcean Cloud Firewall per role, in front of the host firewalls.

The specs (rules, sources, limits) come from enclave.cloudfirewall, checked when the stack is read; this only
maps them onto `digitalocean.Firewall`. They select droplets by the role tag every droplet carries, so adding a
host to a role changes no firewall; only a source naming a single host (`from: mysql-2`) uses a droplet id.

For users: docs/cli.md#plan (the cloud firewalls a plan lists).
"""

from __future__ import annotations

from collections.abc import Sequence

import pulumi
import pulumi_digitalocean as digitalocean

from enclave.cloudfirewall import CloudFirewall, InboundRule


def _inbound(rule: InboundRule, droplet_ids: dict[str, pulumi.Output[int]]) -> digitalocean.FirewallInboundRuleArgs:
    return digitalocean.FirewallInboundRuleArgs(
        protocol=rule.protocol,
        port_range=rule.port_range,
        source_addresses=list(rule.source_addresses) or None,
        source_tags=list(rule.source_tags) or None,
        source_droplet_ids=[droplet_ids[host] for host in rule.source_hosts] or None,
    )


def role_firewalls(
    specs: Sequence[CloudFirewall], droplets: dict[str, digitalocean.Droplet], parent: pulumi.Resource
) -> list[digitalocean.Firewall]:
    """One Firewall per spec. `droplets` maps host names (mysql-2) to droplets."""
    droplet_ids = {host: droplet.id.apply(int) for host, droplet in droplets.items()}
    return [
        digitalocean.Firewall(
            spec.name,
            name=spec.name,
            tags=list(spec.tags),
            inbound_rules=[_inbound(rule, droplet_ids) for rule in spec.inbound_rules],
            outbound_rules=[
                digitalocean.FirewallOutboundRuleArgs(
                    protocol=rule.protocol,
                    port_range=rule.port_range,
                    destination_addresses=list(rule.destination_addresses) or None,
                    destination_tags=list(rule.destination_tags) or None,
                    destination_droplet_ids=[droplet_ids[host] for host in rule.destination_hosts] or None,
                )
                for rule in spec.outbound_rules
            ],
            # DigitalOcean creates a tag with the first droplet carrying it; a firewall naming a tag that does
            # not exist yet is refused, so every firewall waits for the droplets.
            opts=pulumi.ResourceOptions(parent=parent, depends_on=list(droplets.values())),
        )
        for spec in specs
    ]
