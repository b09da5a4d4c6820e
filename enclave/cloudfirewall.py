"""`enclave:cloudFirewall: true`: one DigitalOcean Cloud Firewall per role, derived from the same flows.

Defence in depth: the cloud firewall drops at DigitalOcean's edge what the host firewall would drop anyway, so a
mistake on one host (a flushed table, a tool that opens a port) does not expose it. It is the coarser layer:

- It applies to the role's droplets through the tag `enclave-<stack>-<role>` (`role_tag`), which the program puts
  on every droplet of the role. DigitalOcean creates a tag with the first droplet that carries it, so the
  firewalls must be created after the droplets, and a role with count 0 gets no firewall and admits nothing.
- Sources: a role -> its tag; a single host (`from: mysql-2`) -> that droplet's id, so the edge is exactly as
  narrow as the host firewall (a host's tag would widen it to its whole role); `internet` -> 0.0.0.0/0 and ::/0;
  `operators` -> their CIDRs; a CIDR -> itself.
- It cannot tell the public interface from the private one: a role source is admitted on both, where the host
  firewall admits it only on the private interface. The host firewall stays the precise layer.
- Outbound is open (tcp, udp, icmp to anywhere) for `egress: open` and `restricted` (which the host firewall
  enforces). A role with an egress allowlist gets outbound rules: to the roles (tags) and hosts (droplet ids)
  whose ingress admits it, to its listed entries (`all` -> every role's tag, `internet` -> 0.0.0.0/0 and ::/0, a
  CIDR -> itself) and to the essentials (DigitalOcean's resolvers, the metadata service, NTP anywhere), merged by
  protocol and ports like inbound rules; coarser than the host firewall, which also tells the interfaces apart.
- Flows to a role with the same protocol and ports become one rule listing all their sources: DigitalOcean
  counts rules, not sources, against its limit of 50.

Provider limits (https://docs.digitalocean.com/products/networking/firewalls/details/limits/), checked before
anything is created by `check_cloud_firewalls`, which both the CLI (`enclave.stackargs.stack_from_args`) and the
Pulumi program call right after loading a stack:
- 50 rules per firewall, inbound and outbound entries together (each protocol + port range entry is one rule);
- 5 tags per firewall (enclave applies one);
- 1 000 entries in one rule's sources (addresses, tags and droplet ids together).

Pure logic: no Pulumi. The fields map 1:1 onto `digitalocean.FirewallInboundRuleArgs` /
`FirewallOutboundRuleArgs` (see `InboundRule` and `OutboundRule`).

For users: docs/cli.md#plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from config.schema import NAMESPACE, PortSpec, StackError, StackIssue

from .compiler import Flow, Policy

MAX_RULES = 50
MAX_TAGS = 5
MAX_SOURCES = 1000

ANYWHERE = ("0.0.0.0/0", "::/0")
# DigitalOcean rejects "all" / "0" through the Terraform-based provider; "1-65535" is every port.
ALL_PORTS = "1-65535"
KEY = f"{NAMESPACE}:cloudFirewall"

Protocol = Literal["tcp", "udp", "icmp"]


@dataclass(frozen=True)
class InboundRule:
    """One `digitalocean.FirewallInboundRuleArgs`:

        FirewallInboundRuleArgs(protocol=r.protocol, port_range=r.port_range,
                                source_addresses=list(r.source_addresses), source_tags=list(r.source_tags),
                                source_droplet_ids=[droplet_id[h] for h in r.source_hosts])

    `source_hosts` names stack hosts (e.g. `mysql-2`): their droplet ids exist only once the droplets do.
    """

    protocol: Protocol
    port_range: str | None  # "80", "8000-8100"; None for icmp, which has no ports
    source_addresses: tuple[str, ...] = ()
    source_tags: tuple[str, ...] = ()
    source_hosts: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # the stack keys this rule comes from, for error messages

    @property
    def source_count(self) -> int:
        return len(self.source_addresses) + len(self.source_tags) + len(self.source_hosts)

    def __str__(self) -> str:
        ports = f"/{self.port_range}" if self.port_range else ""
        sources = [f"tag:{t}" for t in self.source_tags] + [f"droplet:{h}" for h in self.source_hosts]
        sources += self.source_addresses
        return f"{self.protocol}{ports} from {', '.join(sources)}"


@dataclass(frozen=True)
class OutboundRule:
    """One `digitalocean.FirewallOutboundRuleArgs(protocol=, port_range=, destination_addresses=,
    destination_tags=, destination_droplet_ids=[droplet_id[h] for h in destination_hosts])`."""

    protocol: Protocol
    port_range: str | None
    destination_addresses: tuple[str, ...]
    destination_tags: tuple[str, ...] = ()
    destination_hosts: tuple[str, ...] = ()

    @property
    def destination_count(self) -> int:
        return len(self.destination_addresses) + len(self.destination_tags) + len(self.destination_hosts)

    def __str__(self) -> str:
        ports = f"/{self.port_range}" if self.port_range else ""
        to = [f"tag:{t}" for t in self.destination_tags] + [f"droplet:{h}" for h in self.destination_hosts]
        return f"{self.protocol}{ports} to {', '.join(to + list(self.destination_addresses))}"


@dataclass(frozen=True)
class CloudFirewall:
    """One `digitalocean.Firewall(name=, tags=, inbound_rules=, outbound_rules=)`, for one role."""

    role: str
    name: str
    tags: tuple[str, ...]
    inbound_rules: tuple[InboundRule, ...]
    outbound_rules: tuple[OutboundRule, ...]

    @property
    def rule_count(self) -> int:
        return len(self.inbound_rules) + len(self.outbound_rules)


OPEN_OUTBOUND = (
    OutboundRule("tcp", ALL_PORTS, ANYWHERE),
    OutboundRule("udp", ALL_PORTS, ANYWHERE),
    OutboundRule("icmp", None, ANYWHERE),
)


def role_tag(stack_name: str, role: str) -> str:
    """The DigitalOcean tag every droplet of `role` carries; cloud firewalls select and admit by it."""
    # Tags take letters, digits, ':', '-' and '_'; a Pulumi stack name may also hold '.'.
    return f"enclave-{re.sub(r'[^A-Za-z0-9:_-]', '-', stack_name)}-{role}"


def firewall_name(stack_name: str, role: str) -> str:
    # Firewall names take letters, digits, '.' and '-' only.
    return re.sub(r"[^A-Za-z0-9.-]", "-", f"enclave-{stack_name}-{role}")


def port_range(port: PortSpec) -> str | None:
    if port.proto == "icmp":
        return None
    return str(port.low) if port.low == port.high else f"{port.low}-{port.high}"


def _flow_key(flow: Flow) -> str:
    if flow.source.kind == "operators":
        return f"{NAMESPACE}:operators"
    if flow.why.startswith("roles."):
        return f"{NAMESPACE}:{flow.why}.from"
    return f"{NAMESPACE}:roles.{flow.role}"  # the built-in SSH access


def _sources(stack_name: str, policy: Policy, flow: Flow) -> tuple[list[str], list[str], list[str]]:
    """(addresses, tags, hosts) admitting this flow's source."""
    source = flow.source
    if source.kind == "role":
        # A role with no droplets has no tag yet (DigitalOcean creates a tag with its first droplet).
        return [], [role_tag(stack_name, source.name)] if policy.stack.roles[source.name].count else [], []
    if source.kind == "host":
        return [], [], [source.name]
    if source.kind == "internet":
        return list(ANYWHERE), [], []
    if source.kind == "operators":
        return [str(net) for net in policy.stack.operators], [], []
    return [source.name], [], []


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def firewall_for_role(stack_name: str, policy: Policy, role: str) -> CloudFirewall:
    # (protocol, port range) -> (addresses, tags, hosts, keys), in the order flows declare them
    merged: dict[tuple[Protocol, str | None], tuple[list[str], list[str], list[str], list[str]]] = {}
    for flow in policy.flows_to_role[role]:
        addresses, tags, hosts = _sources(stack_name, policy, flow)
        for port in flow.ports:
            entry = merged.setdefault((port.proto, port_range(port)), ([], [], [], []))
            entry[0].extend(addresses)
            entry[1].extend(tags)
            entry[2].extend(hosts)
            entry[3].append(_flow_key(flow))
    inbound = tuple(
        InboundRule(proto, ports, _unique(addrs), _unique(tags), _unique(hosts), _unique(keys))
        for (proto, ports), (addrs, tags, hosts, keys) in merged.items()
        if addrs or tags or hosts  # a rule whose sources are all empty roles admits nothing
    )
    outbound = outbound_rules(stack_name, policy, role) if role in policy.egress else OPEN_OUTBOUND
    return CloudFirewall(role, firewall_name(stack_name, role), (role_tag(stack_name, role),), inbound, outbound)


def outbound_rules(stack_name: str, policy: Policy, role: str) -> tuple[OutboundRule, ...]:
    """A role with an egress allowlist: where its droplets may open connections (see the module's docstring)."""
    def tags(roles: list[str]) -> list[str]:
        return [role_tag(stack_name, r) for r in roles if policy.stack.roles[r].count]

    merged: dict[tuple[Protocol, str | None], tuple[list[str], list[str], list[str]]] = {}

    def add(ports: tuple[PortSpec, ...], addresses: list[str], to_tags: list[str], hosts: list[str]) -> None:
        for port in ports:
            entry = merged.setdefault((port.proto, port_range(port)), ([], [], []))
            entry[0].extend(addresses)
            entry[1].extend(to_tags)
            entry[2].extend(hosts)

    for flow in policy.flows:
        source = flow.source
        if flow.interface == "private" and (source.name == role or policy.stack.role_of_host(source.name) == role):
            add(flow.ports, [], tags([flow.role]), [])
    for allowed in policy.egress[role]:
        if allowed.kind == "role":
            add(allowed.ports, [], tags([allowed.to]), [])
        elif allowed.kind == "all":
            add(allowed.ports, [], tags(list(policy.stack.roles)), [])
        elif allowed.kind == "host":
            add(allowed.ports, [], [], [allowed.to])
        else:
            add(allowed.ports, list(ANYWHERE) if allowed.kind == "internet" else [allowed.to], [], [])
    return tuple(
        OutboundRule(proto, ports, _unique(addrs), _unique(to_tags), _unique(hosts))
        for (proto, ports), (addrs, to_tags, hosts) in merged.items()
        if addrs or to_tags or hosts
    )


def cloud_firewalls(stack_name: str, policy: Policy) -> list[CloudFirewall]:
    """One firewall per role that has droplets, whether or not the stack turns them on (see `check_cloud_firewalls`).

    A role with count 0 gets none: its tag does not exist until a droplet carries it.
    """
    return [firewall_for_role(stack_name, policy, role) for role, spec in policy.stack.roles.items() if spec.count]


def limit_issues(firewall: CloudFirewall) -> list[StackIssue]:
    """What DigitalOcean would refuse in this firewall, named by the stack key to edit."""
    issues: list[StackIssue] = []
    role_key = f"{NAMESPACE}:roles.{firewall.role}.ingress"
    if firewall.rule_count > MAX_RULES:
        issues.append(
            StackIssue(
                role_key,
                f"with {KEY} true, role {firewall.role}'s cloud firewall needs {firewall.rule_count} rules "
                f"({len(firewall.inbound_rules)} inbound, one per protocol and port range, plus "
                f"{len(firewall.outbound_rules)} outbound) but DigitalOcean allows {MAX_RULES} per firewall; "
                "merge neighbouring ports into ranges (e.g. tcp/8000-8100), or set enclave:cloudFirewall: false",
            )
        )
    if len(firewall.tags) > MAX_TAGS:
        issues.append(
            StackIssue(
                f"{NAMESPACE}:roles.{firewall.role}",
                f"with {KEY} true, role {firewall.role}'s cloud firewall would apply to {len(firewall.tags)} tags "
                f"but DigitalOcean allows {MAX_TAGS} per firewall; split the role, or set enclave:cloudFirewall: false",
            )
        )
    for out in firewall.outbound_rules:
        if out.destination_count > MAX_SOURCES:
            issues.append(
                StackIssue(
                    f"{NAMESPACE}:roles.{firewall.role}.egress",
                    f"with {KEY} true, role {firewall.role}'s cloud firewall outbound rule {out} has "
                    f"{out.destination_count} destinations but DigitalOcean allows {MAX_SOURCES} per rule; use wider "
                    "CIDRs or roles, or set enclave:cloudFirewall: false",
                )
            )
    for rule in firewall.inbound_rules:
        if rule.source_count > MAX_SOURCES:
            issues.append(
                StackIssue(
                    ", ".join(rule.keys),
                    f"with {KEY} true, role {firewall.role}'s cloud firewall rule for {rule.protocol}"
                    f"{'/' + rule.port_range if rule.port_range else ''} has {rule.source_count} sources but "
                    f"DigitalOcean allows {MAX_SOURCES} per rule; use wider CIDRs (e.g. one /24 instead of its "
                    "addresses) or roles, or set enclave:cloudFirewall: false",
                )
            )
    return issues


def check_cloud_firewalls(stack_name: str, policy: Policy) -> list[CloudFirewall]:
    """The stack's cloud firewalls when `enclave:cloudFirewall` is true ([] otherwise); StackError over a limit.

    Call right after loading a stack, before creating anything: the CLI does it in `stack_from_args`, the
    Pulumi program before it declares resources (and it maps the returned specs onto `digitalocean.Firewall`).
    """
    if not policy.stack.cloud_firewall:
        return []
    firewalls = cloud_firewalls(stack_name, policy)
    issues = [issue for firewall in firewalls for issue in limit_issues(firewall)]
    if issues:
        raise StackError(issues, f"stack {stack_name}")
    return firewalls
