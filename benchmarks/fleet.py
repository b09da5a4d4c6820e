"""Generated stacks of any size, shaped like prod, for the benchmarks.

prod has a bastion, a public load balancer and two private tiers (wordpress, mysql) that admit each other.
A role holds at most `MAX_PER_ROLE` hosts (the schema's limit), so a large fleet keeps prod's tiers but in
`CELLS` cells (wordpress-a + mysql-a, wordpress-b + mysql-b, ...), each cell admitting only itself, exactly
as prod's two tiers do. The shape is the same at every size: only counts change, which is what an operator
scaling by `count` does, so rules per host must not change with size.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from config.schema import Role, StackConfig, load_config
from config.stackfile import Stack, parse_stack_yaml, stack_path

CELLS = 4
CELL_NAMES = "abcdefghijklmnopqrstuvwxyz"
# Private tiers of prod that get one copy per cell; the other roles (bastion, load balancer) are shared.
TIERS = ("wordpress", "mysql")
VPC = "10.0.0.0/16"


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


def _rename(source: str, cell: str) -> str:
    return f"{source}-{cell}" if source in TIERS else source


def prod_shaped(hosts: int, cells: int = CELLS) -> dict[str, Any]:
    """`enclave:` keys of a stack with `hosts` hosts in prod's shape (see the module docstring)."""
    base = prod_values()
    roles: dict[str, Any] = base["roles"]
    shared = [name for name in roles if name not in TIERS]
    slots = len(shared) + cells * len(TIERS)
    if hosts < slots:
        raise ValueError(f"a prod-shaped stack with {cells} cells needs at least {slots} hosts, not {hosts}")
    values = copy.deepcopy(base)
    values["vpcIpRange"] = VPC
    out: dict[str, Any] = {}
    # The load balancer grows with the fleet (1 per 100 hosts), the bastion stays one.
    balancers = [n for n in shared if not roles[n].get("bastion")]
    fixed = {n: 1 for n in shared}
    for name in balancers:
        fixed[name] = max(1, hosts // 100)
    rest = hosts - sum(fixed.values())
    tier_slots = cells * len(TIERS)
    for name in shared:
        out[name] = dict(copy.deepcopy(roles[name]), count=fixed[name])
    for c in range(cells):
        cell = CELL_NAMES[c]
        for t, tier in enumerate(TIERS):
            slot = c * len(TIERS) + t
            count = rest // tier_slots + (1 if slot < rest % tier_slots else 0)
            spec = copy.deepcopy(roles[tier])
            spec["count"] = count
            for rule in spec.get("ingress", []):
                sources = rule["from"] if isinstance(rule["from"], list) else [rule["from"]]
                rule["from"] = [_rename(s, cell) for s in sources]
            out[f"{tier}-{cell}"] = spec
    values["roles"] = out
    # prod's tests, pointed at cell a; tests naming single hosts are left out (they need counts >= 2).
    tests = []
    for test in base.get("tests", []):
        ends = (test["from"], test["to"])
        if any(e not in roles and e not in ("internet", "operators", "neighbor") for e in ends):
            continue
        tests.append(dict(test, **{"from": _rename(test["from"], "a"), "to": _rename(test["to"], "a")}))
    values["tests"] = tests
    return values


def prod_shaped_stack(hosts: int, name: str = "bench") -> Stack:
    return Stack(name, load_config(prod_shaped(hosts), f"generated {hosts}-host stack"))


def peers_stack(
    peers: int, port: int, private_interface: str, public_interface: str = "pub0", per_role: int = MAX_PER_ROLE
) -> StackConfig:
    """A stack whose role `server` admits `peers` hosts on tcp/<port> and udp/<port>.

    Peers are split in roles of `per_role` hosts (`peer-a`, `peer-b`, ...), at most the schema's limit as a
    real stack must. A larger `per_role` gives a stack no stack file can express (the counts are raised
    after validation): the benchmarks use it only to show what the split costs.
    The ruleset of `server-1` is what the data-plane and apply benchmarks load.
    """
    groups = math.ceil(peers / per_role)
    base = prod_values()
    names = [f"peer-{CELL_NAMES[g // 26 - 1] if g >= 26 else ''}{CELL_NAMES[g % 26]}" for g in range(groups)]
    counts = {name: min(per_role, peers - g * per_role) for g, name in enumerate(names)}
    roles: dict[str, Any] = {"tunnel": {"count": 1, "size": "s-1vcpu-1gb", "bastion": True}}
    for name, count in counts.items():
        roles[name] = {"count": min(count, MAX_PER_ROLE), "size": "s-1vcpu-1gb"}
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
    stack = load_config(values, f"generated stack admitting {peers} peers")
    if per_role <= MAX_PER_ROLE:
        return stack
    raised = {n: r.model_copy(update={"count": counts[n]}) if n in counts else r for n, r in stack.roles.items()}
    return stack.model_copy(update={"roles": raised})


__all__ = ["CELLS", "MAX_PER_ROLE", "peers_stack", "prod_shaped", "prod_shaped_stack"]
