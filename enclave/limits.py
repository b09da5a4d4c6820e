"""The stack's limits on what it expands to, counted on the compiled policy as the renderer renders it.

Two limits (config/models.py holds the numbers and why; docs/stack-file.md "Limits" explains them to users):
MAX_RULES_PER_HOST rules in one table of any host, and MAX_SET_MEMBERS ipset members over the whole fleet.
Both are counted on what the renderer emits for one host of each role (every host of a role gets the same rules
and sets, except a host that an entry names on its own, which is rendered on its own), so the count is exact
and cannot drift from the rule logic. Only a role whose entries declare more than RENDER_BOUND (source, port)
pairs is refused on that declared count without rendering: no stack file can make the check itself unbounded.

`enclave` (enclave/stackargs.py) and the Pulumi program (components/stack_config.py) call this right after
loading a stack, before anything is planned, pushed or created.
"""

from __future__ import annotations

from config.schema import MAX_RULES_PER_HOST, MAX_SET_MEMBERS, NAMESPACE, StackError, StackIssue
from config.stackfile import Stack

from .compiler import Host, Policy
from .plan import example_addresses
from .render import Renderer
from .rulefiles import FORWARD_CHAIN, RuleFiles

RENDER_BOUND = 50 * MAX_RULES_PER_HOST
PREFIX = NAMESPACE + ":"


def declared_pairs(policy: Policy, role: str) -> int:
    """(flow, port) pairs a host of `role` could get rules for, before identical rules are merged: an upper bound."""
    inbound = sum(len(flow.ports) for flow in policy.flows_to_role[role])
    restricted = policy.stack.roles[role].egress != "open"
    outbound = sum(
        len(flow.ports) for flow in policy.flows
        if restricted and flow.interface == "private" and flow.source.kind in ("role", "host")
        and (flow.source.name == role or policy.stack.role_of_host(flow.source.name) == role)
    )
    # an allowlist's entries: `all` is a rule per role and port
    listed = sum(len(e.ports) * (len(policy.stack.roles) if e.kind == "all" else 1) for e in policy.egress.get(role, []))
    return 2 * inbound + outbound + 2 * listed  # both tables, as an upper bound


def rules_in_largest_table(files: RuleFiles) -> int:
    """Rules a packet to the host can walk in one table. ENCLAVE-FORWARD (published container ports) carries over
    INPUT's accept lines one for one and a packet walks one of the two, so the limit counts INPUT's side."""
    return max(sum(line.startswith("-A ") and not line.startswith(f"-A {FORWARD_CHAIN} ") for line in text.splitlines())
               for text in (files.ipv4, files.ipv6))


def set_members(files: RuleFiles) -> int:
    return sum(line.startswith("add ") for line in files.ipsets.splitlines())


def limit_issues(policy: Policy) -> list[StackIssue]:
    """Roles whose hosts would get more than MAX_RULES_PER_HOST rules in one table; a fleet whose hosts would
    carry more than MAX_SET_MEMBERS set members in all."""
    named = {flow.source.name for flow in policy.flows if flow.source.kind == "host"}
    renderer: Renderer | None = None
    issues: list[StackIssue] = []
    members_of_role: dict[str, int] = {}
    for role, spec in policy.stack.roles.items():
        if spec.count == 0:
            continue
        declared = declared_pairs(policy, role)
        if declared > RENDER_BOUND:
            issues.append(too_many_rules(role, f"up to {declared} rules (its entries declare that many source and "
                                                 "port pairs)"))
            continue
        if renderer is None:
            renderer = Renderer(policy, example_addresses(policy))
        hosts = [Host(role, n) for n in range(1, spec.count + 1)]
        alone = [renderer.render(h) for h in hosts if h.name in named]  # named by an entry: rendered one by one
        like = next((h for h in hosts if h.name not in named), None)  # every other host: rendered as one
        rendered = alone + ([renderer.render(like)] if like is not None else [])
        members_of_role[role] = sum(set_members(f) for f in alone) + (
            (spec.count - len(alone)) * set_members(rendered[-1]) if like is not None else 0
        )
        rules = max(rules_in_largest_table(f) for f in rendered)
        if rules > MAX_RULES_PER_HOST:
            issues.append(too_many_rules(role, f"{rules} rules"))
    members = sum(members_of_role.values())
    if members > MAX_SET_MEMBERS:
        biggest = max(members_of_role, key=lambda r: members_of_role[r])
        issues.append(StackIssue(
            f"{PREFIX}roles",
            f"the hosts would carry {members} ipset members in all (each lists every host of every role it admits "
            f"or sends to; most of them on the {policy.stack.roles[biggest].count} hosts of {biggest}), over the "
            f"limit of {MAX_SET_MEMBERS} (docs/stack-file.md: Limits): lower the counts, admit fewer roles, or split "
            "the fleet into stacks",
        ))
    return issues


def too_many_rules(role: str, count: str) -> StackIssue:
    return StackIssue(
        f"{PREFIX}roles.{role}.ingress",
        f"its hosts would get {count}, over the limit of {MAX_RULES_PER_HOST} per host: declare port ranges "
        "(tcp/8000-8100) and roles rather than one entry per port or address",
    )


def check_limits(stack: Stack, policy: Policy) -> None:
    """StackError naming each key over a limit, as a stack file error (nothing was created or changed)."""
    issues = limit_issues(policy)
    if issues:
        raise StackError(issues, str(stack.path) if stack.path is not None else f"stack {stack.name}")
