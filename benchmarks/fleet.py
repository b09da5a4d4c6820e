"""Generated stacks of any size, shaped like prod, for the benchmarks.

prod has a bastion, a public load balancer and two private tiers (wordpress, mysql) that admit each other.
A generated stack has exactly prod's roles and declarations; only counts change, which is what an operator
scaling by `count` does: one bastion, one load balancer per 100 hosts, the rest shared between the other roles
in prod's proportions. Rules per host must therefore not change with size.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from config.schema import Role, StackConfig, load_config
from config.stackfile import Stack, parse_stack_yaml, stack_path

VPC = "10.0.0.0/16"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def max_per_role() -> int:
    """The schema's upper bound on `count` (read from the model, so the benchmarks follow the schema)."""
    for meta in Role.model_fields["count"].metadata:
        bound = getattr(meta, "le", None)
        if isinstance(bound, int):
            return bound
    return 1_000_000


MAX_PER_ROLE = max_per_role()


def prod_values() -> dict[str, Any]:
    """prod's `enclave:` keys, prefix removed, as the CLI reads them."""
    path = stack_path("prod")
    return parse_stack_yaml(path.read_text(), str(path))


def _admits_internet(spec: dict[str, Any]) -> bool:
    return any("internet" in (r["from"] if isinstance(r["from"], list) else [r["from"]]) for r in spec.get("ingress", []))


def prod_shaped(hosts: int) -> dict[str, Any]:
    """`enclave:` keys of a stack with `hosts` hosts in prod's shape (see the module docstring)."""
    values = copy.deepcopy(prod_values())
    values["vpcIpRange"] = VPC
    roles: dict[str, Any] = values["roles"]
    fixed = {name: 1 for name, spec in roles.items() if spec.get("bastion")}
    fixed.update({name: max(1, hosts // 100) for name, spec in roles.items() if _admits_internet(spec)})
    tiers = {name: spec["count"] for name, spec in roles.items() if name not in fixed}
    rest = hosts - sum(fixed.values())
    if rest < 2 * len(tiers):
        raise ValueError(f"a prod-shaped stack needs more than {hosts} hosts")
    counts = dict(fixed)
    weight = sum(tiers.values())
    for name, prod_count in tiers.items():
        counts[name] = rest * prod_count // weight
    counts[next(iter(tiers))] += hosts - sum(counts.values())  # rounding
    for name, spec in roles.items():
        spec["count"] = counts[name]
    return values


def prod_shaped_stack(hosts: int, name: str = "bench") -> Stack:
    return Stack(name, load_config(prod_shaped(hosts), f"generated {hosts}-host stack"))


def peers_stack(
    peers: int, port: int, private_interface: str, public_interface: str = "pub0", per_role: int = MAX_PER_ROLE
) -> StackConfig:
    """A stack whose role `server` admits `peers` hosts on tcp/<port> and udp/<port>, in one `from`.

    Peers are in roles of `per_role` hosts (`peer-a`, `peer-b`, ...): one role unless `per_role` is smaller.
    The ruleset of `server-1` is what the data-plane and apply benchmarks load.
    """
    if not 1 <= per_role <= MAX_PER_ROLE:
        raise ValueError(f"per_role must be 1 to {MAX_PER_ROLE}, the schema's limit")
    groups = math.ceil(peers / per_role)
    base = prod_values()
    names = [f"peer-{LETTERS[g // 26 - 1] if g >= 26 else ''}{LETTERS[g % 26]}" for g in range(groups)]
    roles: dict[str, Any] = {"tunnel": {"count": 1, "size": "s-1vcpu-1gb", "bastion": True}}
    for g, name in enumerate(names):
        roles[name] = {"count": min(per_role, peers - g * per_role), "size": "s-1vcpu-1gb"}
    roles["server"] = {
        "count": 1,
        "size": "s-1vcpu-1gb",
        "ingress": [{"from": names, "ports": [f"tcp/{port}", f"udp/{port}"]}],
    }
    values = {
        "region": base["region"],
        "vpcIpRange": VPC,
        "image": base["image"],
        "sshPublicKey": base["sshPublicKey"],
        "operators": base["operators"],
        "interfaces": {"public": public_interface, "private": private_interface},
        "roles": roles,
    }
    return load_config(values, f"generated stack admitting {peers} peers")


__all__ = ["MAX_PER_ROLE", "VPC", "peers_stack", "prod_shaped", "prod_shaped_stack", "prod_values"]
