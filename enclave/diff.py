"""`enclave plan --diff-from OLD.yaml`: what a stack change would do to each host, before anything is pushed.

Like `pulumi preview`, per host: created, deleted, updated (with the rule lines removed and added, and the
ipset members that join or leave a set) or unchanged. Both sides are rendered by the same `build_plan`, so the
lines shown are exactly the lines that would land.

Hosts keep their addresses across a change, as droplets do: a host in both stacks gets its old addresses (from
`--addresses` for the deployed stack, else the example ones), and only new hosts get fresh ones. Otherwise
scaling one role would shift every example address after it and show changes that would never happen.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from config.schema import NAMESPACE, StackConfig, StackError, StackIssue
from config.stackfile import Stack

from .compiler import Addresses, Policy, compile_policy
from .plan import EXAMPLE_PUBLIC, EXAMPLE_PUBLIC6, Plan, build_plan, example_addresses
from .ipsets import base_name, without_generations
from .ipsets import parse_ipsets as parse_ipsets  # looked up here at call time (tests count the calls)
from .render import RuleFiles

Action = Literal["create", "update", "delete", "same"]
RULE_FILES = ("rules.v4", "rules.v6")


@dataclass(frozen=True)
class LineChange:
    """One file's changed lines, in file order: `-` lines then `+` lines for each changed stretch."""

    file: str  # rules.v4 | rules.v6
    lines: tuple[tuple[str, str], ...]  # ("-" | "+", line)

    @property
    def added(self) -> int:
        return sum(sign == "+" for sign, _ in self.lines)

    @property
    def removed(self) -> int:
        return sum(sign == "-" for sign, _ in self.lines)


@dataclass(frozen=True)
class SetChange:
    """An ipset on one host: new to it, gone from it, or with members joining and leaving."""

    name: str
    kind: Literal["added", "removed", "changed"]
    joined: tuple[str, ...]
    left: tuple[str, ...]


@dataclass(frozen=True)
class HostChange:
    host: str
    role: str
    action: Action
    files: tuple[LineChange, ...] = ()
    sets: tuple[SetChange, ...] = ()
    rules: int = 0  # for a created or deleted host: its rule count


@dataclass
class PlanDiff:
    stack_name: str
    hosts: list[HostChange]
    readdressed: bool = False  # vpcIpRange changed: every host gets a new private address
    notes: list[str] = field(default_factory=list)

    def count(self, action: Action) -> int:
        return sum(h.action == action for h in self.hosts)

    @property
    def lines_added(self) -> int:
        return sum(f.added for h in self.hosts if h.action == "update" for f in h.files)

    @property
    def lines_removed(self) -> int:
        return sum(f.removed for h in self.hosts if h.action == "update" for f in h.files)

    @property
    def members_joined(self) -> int:
        return sum(len(s.joined) for h in self.hosts if h.action == "update" for s in h.sets)

    @property
    def members_left(self) -> int:
        return sum(len(s.left) for h in self.hosts if h.action == "update" for s in h.sets)

    def summary(self) -> str:
        return (
            f"hosts: {self.count('create')} to create, {self.count('update')} to update, "
            f"{self.count('delete')} to delete, {self.count('same')} unchanged; on updated hosts: "
            f"rule lines +{self.lines_added} -{self.lines_removed}, "
            f"set members +{self.members_joined} -{self.members_left}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack_name,
            "hosts": [
                {
                    "host": h.host,
                    "role": h.role,
                    "action": h.action,
                    "rules": h.rules,
                    "files": {f.file: [sign + " " + line for sign, line in f.lines] for f in h.files},
                    "sets": [{"set": s.name, "change": s.kind, "joined": s.joined, "left": s.left} for s in h.sets],
                }
                for h in self.hosts
            ],
            "readdressed": self.readdressed,
            "notes": self.notes,
            "summary": self.summary(),
        }


# ------------------------------------------------------------------------------------------ addresses


class _Pool:
    """Free addresses from a sequence, preferring a given one (the new stack's own example address)."""

    def __init__(self, candidates: Iterator[str], used: set[str]) -> None:
        self.candidates = candidates
        self.used = used

    def take(self, preferred: str | None) -> str | None:
        if preferred is not None and preferred not in self.used:
            self.used.add(preferred)
            return preferred
        for address in self.candidates:
            if address not in self.used:
                self.used.add(address)
                return address
        return None


def carried_addresses(old: dict[str, Addresses], policy: Policy) -> tuple[dict[str, Addresses], bool]:
    """Addresses for the new stack's hosts: old ones kept, new hosts on free ones; (addresses, readdressed)."""
    fresh = example_addresses(policy)
    vpc = policy.stack.vpc_ip_range
    if any(ipaddress.ip_address(a.private) not in vpc for a in old.values()):
        # A new vpcIpRange means a new VPC: every droplet is re-created with a new address.
        return fresh, True
    kept = {h.name: old[h.name] for h in policy.hosts if h.name in old}
    privates = _Pool(
        (str(vpc.network_address + i) for i in range(2, vpc.num_addresses - 1)), {a.private for a in kept.values()}
    )
    publics = _Pool(
        (str(EXAMPLE_PUBLIC.network_address + 10 + i) for i in range(EXAMPLE_PUBLIC.num_addresses - 11)),
        {a.public for a in kept.values() if a.public},
    )
    publics6 = _Pool(
        (str(EXAMPLE_PUBLIC6.network_address + 0x10 + i) for i in range(1 << 20)),
        {a.public6 for a in kept.values() if a.public6},
    )
    out: dict[str, Addresses] = {}
    for host in policy.hosts:
        before, example = kept.get(host.name), fresh[host.name]
        private = before.private if before else privates.take(example.private)
        # a role that changed `public` is on new droplets: a public address only where the new role has one
        public = (before.public if before and before.public else publics.take(example.public)) if example.public else None
        public6 = None
        if policy.stack.roles[host.role].ipv6:
            public6 = before.public6 if before and before.public6 else publics6.take(example.public6)
        if private is None or (public is None and example.public):
            raise StackError(
                [StackIssue(f"{NAMESPACE}:vpcIpRange", f"{vpc} has no free address left for {host.name}; use a larger range")]
            )
        out[host.name] = Addresses(public, private, public6)
    return out, False


# ------------------------------------------------------------------------------------------ comparing


def _line_changes(name: str, old: str, new: str) -> LineChange | None:
    # Comment lines carry the stack and host name only; what counts is what iptables-restore reads. A rule that
    # only follows its set to a new generation is unchanged: the set change says which members join and leave.
    a = [line for line in old.splitlines() if line and not line.startswith("#")]
    b = [line for line in new.splitlines() if line and not line.startswith("#")]
    lines: list[tuple[str, str]] = []
    compared = difflib.SequenceMatcher(a=without_generations("\n".join(a)).split("\n"),
                                       b=without_generations("\n".join(b)).split("\n"), autojunk=False)
    for tag, i1, i2, j1, j2 in compared.get_opcodes():
        if tag == "equal":
            continue
        lines += [("-", line) for line in a[i1:i2]]
        lines += [("+", line) for line in b[j1:j2]]
    return LineChange(name, tuple(lines)) if lines else None


def _by_base_name(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    # A set whose members change lands under a new generation name: it is the same set, its members joining and
    # leaving, so sets are compared by the name without the generation.
    return {base_name(name): contents for name, contents in parse_ipsets(text).items()}


def _set_changes(old: str, new: str) -> list[SetChange]:
    before, after = _by_base_name(old), _by_base_name(new)
    out = []
    for name in sorted(before.keys() | after.keys()):
        if name not in before:
            out.append(SetChange(name, "added", after[name][1], ()))
        elif name not in after:
            out.append(SetChange(name, "removed", (), before[name][1]))
        else:
            (old_type, old_members), (new_type, new_members) = before[name], after[name]
            # membership in sets, not tuples: a 5 000-host fleet compared 5 000 x 5 000 members per host here
            old_set, new_set = set(old_members), set(new_members)
            joined = tuple(m for m in new_members if m not in old_set)
            left = tuple(m for m in old_members if m not in new_set)
            if joined or left or old_type != new_type:
                out.append(SetChange(name, "changed", joined, left))
    return out


def _files(files: RuleFiles) -> dict[str, str]:
    return {"rules.v4": files.ipv4, "rules.v6": files.ipv6}


def diff_plans(old: Plan, new: Plan, readdressed: bool = False) -> PlanDiff:
    hosts: list[HostChange] = []
    # A host's ipsets file holds every member of every role it admits, so parsing each host's file is
    # hosts x members lines (25 million in a 5 000-host fleet). Hosts of one role carry the same file: compare
    # each distinct (old, new) pair once. What remains per host is hashing its text, at C speed.
    set_changes_of: dict[tuple[str, str], tuple[SetChange, ...]] = {}
    for host in new.policy.hosts:
        files = new.files[host.name]
        if host.name not in old.files:
            hosts.append(HostChange(host.name, host.role, "create", rules=files.rule_count))
            continue
        before = old.files[host.name]
        line_changes = [
            change
            for name in RULE_FILES
            if (change := _line_changes(name, _files(before)[name], _files(files)[name])) is not None
        ]
        pair = (before.ipsets, files.ipsets)
        if pair not in set_changes_of:
            set_changes_of[pair] = tuple(_set_changes(*pair))
        set_changes = set_changes_of[pair]
        action: Action = "update" if line_changes or set_changes else "same"
        hosts.append(HostChange(host.name, host.role, action, tuple(line_changes), tuple(set_changes)))
    for host in old.policy.hosts:
        if host.name not in new.files:
            hosts.append(HostChange(host.name, host.role, "delete", rules=old.files[host.name].rule_count))
    diff = PlanDiff(new.stack.name, hosts, readdressed)
    if readdressed:
        diff.notes.append("vpcIpRange changed: every droplet is re-created in the new VPC with a new address")
    diff.notes += replacement_notes(old.policy, new.policy)
    diff.notes += description_notes(old, new)
    return diff


def replacement_notes(old: Policy, new: Policy) -> list[str]:
    """Roles whose droplets a change re-creates although the rules alone would only be pushed: `public` is fixed
    when DigitalOcean creates a droplet (the provider's `public_networking` forces a new droplet)."""
    notes = []
    for name, role in new.stack.roles.items():
        before = old.stack.roles.get(name)
        if before is None or before.public == role.public or role.count == 0:
            continue
        hosts = ", ".join(h.name for h in new.hosts_of(name) if h.name in old.host_by_name)
        if hosts:
            notes.append(f"roles.{name}.public changed ({str(before.public).lower()} -> {str(role.public).lower()}): "
                         f"droplets {hosts} are replaced (public networking is fixed when a droplet is created): "
                         "their disks are wiped, and they boot with new addresses")
    return notes


def description_notes(old: Plan, new: Plan) -> list[str]:
    """A role's changed `description:`: it lives in the plan and the diagram, not in any rule, so no host changes
    for it (an entry's description is its rules' comment, and shows as their changed lines)."""
    notes = []
    for role, spec in new.policy.stack.roles.items():
        before = old.policy.stack.roles.get(role)
        if before is not None and before.description != spec.description:
            notes.append(f"roles.{role}.description: {before.description or '(none)'!r} -> "
                         f"{spec.description or '(none)'!r} (no rule changes)")
    return notes


def compare_stacks(
    new_stack: Stack, old_config: StackConfig, old_addresses: dict[str, Addresses] | None = None
) -> tuple[Plan, PlanDiff]:
    """The new stack's plan and its diff from `old_config` (the same stack as deployed now)."""
    old = build_plan(Stack(new_stack.name, old_config), old_addresses)
    addresses, readdressed = carried_addresses(old.addresses, compile_policy(new_stack.config))
    new = build_plan(new_stack, addresses)
    return new, diff_plans(old, new, readdressed)


# ------------------------------------------------------------------------------------------- showing

SIGN = {"create": "+", "update": "~", "delete": "-", "same": " "}
STYLE = {"create": "green", "update": "yellow", "delete": "red", "same": "dim", "+": "green", "-": "red"}


def diff_lines(diff: PlanDiff) -> list[tuple[str, str]]:
    """(rich style, text) lines, `pulumi preview` style: one block per changed host, then the summary."""
    out: list[tuple[str, str]] = [("", note) for note in diff.notes]
    for h in diff.hosts:
        if h.action == "same":
            continue
        head = f"{SIGN[h.action]} {h.host} (role {h.role}): {h.action}"
        if h.action in ("create", "delete"):
            head += f", {h.rules} rules"
        out.append((STYLE[h.action], head))
        for s in h.sets:
            if s.kind == "added":
                out.append(("green", f"    + set {s.name}: {' '.join(s.joined) or '(empty)'}"))
            elif s.kind == "removed":
                out.append(("red", f"    - set {s.name}"))
            else:
                members = [f"+{m}" for m in s.joined] + [f"-{m}" for m in s.left]
                out.append(("yellow", f"    ~ set {s.name}: {' '.join(members) or 'type changed'}"))
        for f in h.files:
            out.append(("", f"    {f.file}:"))
            out += [(STYLE[sign], f"      {sign} {line}") for sign, line in f.lines]
    same = [h.host for h in diff.hosts if h.action == "same"]
    if same:
        out.append(("dim", f"  unchanged: {', '.join(same)}"))
    out.append(("bold", diff.summary()))
    return out
