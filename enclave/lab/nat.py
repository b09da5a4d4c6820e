"""The lab's stand-in for the VPC NAT gateway of a stack with private roles (`public: false`).

On DigitalOcean, a droplet without public networking has one interface (eth0, on the VPC) and reaches the
Internet only through the VPC's NAT gateway, which is the VPC's default route (docs/operations.md "Private
roles"). In the lab, the namespace `enc-<run>-nat` is that gateway: one leg on the private bridge at a VPC
address (the gateway IP), one on the public bridge at a public address (its egress IP); the private hosts'
default route points at its VPC address; it forwards what they send out and masquerades it behind its public
address, and forwards nothing the other way but the replies (conntrack), as a NAT gateway does: nothing on the
Internet can open a connection to a private host through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from config.schema import StackConfig

from ..compiler import Addresses
from ..plan import EXAMPLE_PUBLIC, Outsiders


@dataclass(frozen=True)
class NatAddresses:
    private: str  # on the VPC: the private hosts' default gateway
    public: str  # where their Internet traffic comes from


def nat_addresses(stack: StackConfig, addresses: dict[str, Addresses], others: Outsiders) -> NatAddresses | None:
    """The lab gateway's addresses, or None when the stack has no NAT gateway (no private role, or opted out)."""
    if not stack.uses_nat_gateway():
        return None
    vpc = stack.vpc_ip_range
    used = {a.private for a in addresses.values()} | {others.neighbor.address}
    private = next(str(a) for a in (vpc.broadcast_address - k for k in range(1, 128)) if str(a) not in used)
    return NatAddresses(private=private, public=str(EXAMPLE_PUBLIC.broadcast_address - 1))


def nat_rules(stack: StackConfig, public_interface: str, private_interface: str) -> str:
    """The gateway's iptables-restore file: masquerade the VPC out of the public leg, forward only that way
    (and the replies back)."""
    vpc = stack.vpc_ip_range
    return "\n".join([
        "*nat",
        f"-A POSTROUTING -o {public_interface} -s {vpc} -j MASQUERADE",
        "COMMIT",
        "*filter",
        ":FORWARD DROP [0:0]",
        "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A FORWARD -i {private_interface} -o {public_interface} -s {vpc} -j ACCEPT",
        "COMMIT",
        "",
    ])
