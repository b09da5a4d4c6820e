"""The one reader of a host's netfilter state: `iptables-save`, `ip6tables-save` and `ipset save` text in, one
canonical form out. `enclave audit` and the lab's per-host proof both compare through it, so they cannot
disagree about what a host runs.

Both sides of every comparison are the kernel's own spelling: the live state is saved on the host, and the
compiled files are loaded into a scratch network namespace and saved back from there. What the reader removes
is what differs between two saves of the same state: the `#` lines (timestamps), the packet and byte counters
(`[n:m]`, also in front of rules saved with `-c`), ipset's random hash seed (`initval 0x…`), and the order of
a set's members (a hash set has none). Rule comments (`-m comment`) stay: they are part of the rules.

Pure text; no root, no subprocess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from config.names import SET_PREFIX

from .rulefiles import CHAIN_PREFIX

# One trip to the host's console or shell: every family's tables and the sets, each after its marker line.
SAVE_SH = 'iptables-save; echo "#=ipv6"; ip6tables-save; echo "#=sets"; ipset save'
FAMILIES = ("IPv4", "IPv6")
_COUNTERS = re.compile(r" \[\d+:\d+\]$")
_RULE_COUNTERS = re.compile(r"^\[\d+:\d+\] ")
_INITVAL = re.compile(r" initval 0x[0-9a-fA-F]+")


class KernelStateError(ValueError):
    """Text that is not what iptables-save or ipset save print."""


@dataclass(frozen=True)
class Chain:
    name: str
    policy: str  # ACCEPT/DROP for a built-in chain, "-" for a user chain
    rules: tuple[str, ...]  # `-A NAME …` lines, in order

    @property
    def enclave(self) -> bool:
        return self.name.startswith(f"{CHAIN_PREFIX}-")


@dataclass(frozen=True)
class Table:
    family: str  # IPv4 or IPv6
    name: str  # filter, nat, mangle, raw, security
    chains: tuple[Chain, ...]  # in the order the save declares them

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.chains if c.name == name), None)


@dataclass(frozen=True)
class IpSet:
    name: str
    definition: str  # the `create` line without its random initval
    members: frozenset[str]

    @property
    def enclave(self) -> bool:
        return self.name.startswith(SET_PREFIX)


@dataclass(frozen=True)
class KernelState:
    tables: tuple[Table, ...]
    sets: tuple[IpSet, ...]  # by name

    def table(self, family: str, name: str = "filter") -> Table | None:
        return next((t for t in self.tables if t.family == family and t.name == name), None)

    def enclave_rules(self, family: str) -> list[str]:
        """The rules of enclave's chains (ENCLAVE-*) in the filter table, chain by chain, each in order."""
        table = self.table(family)
        return [rule for chain in (table.chains if table else ()) if chain.enclave for rule in chain.rules]

    def jumps(self, family: str) -> set[str]:
        """The rules of the filter table's other chains that jump into an enclave chain (`-A INPUT -j ENCLAVE-INPUT`)."""
        table = self.table(family)
        return {rule for chain in (table.chains if table else ()) if not chain.enclave
                for rule in chain.rules if re.search(rf" -[jg] {CHAIN_PREFIX}-\S+$", rule)}

    def enclave_sets(self) -> dict[str, frozenset[str]]:
        """enclave's sets (enclave-*) and their members; other tools' sets (f2b-*, docker's) left out."""
        return {s.name: s.members for s in self.sets if s.enclave}

    def render(self) -> str:
        """The canonical text (tables in save order, sets by name, members sorted): what the lab's proof
        compares and shows a difference of line by line."""
        lines = []
        for table in self.tables:
            lines.append(f"*{table.name} ({table.family})")
            lines += [f":{chain.name} {chain.policy}" for chain in table.chains]
            lines += [rule for chain in table.chains for rule in chain.rules]
            lines.append("COMMIT")
        for ipset in self.sets:
            lines.append(ipset.definition)
            lines += sorted(f"add {ipset.name} {member}" for member in ipset.members)
        return "\n".join(lines) + "\n"


def parse_tables(text: str, family: str) -> tuple[Table, ...]:
    """iptables-save (or ip6tables-save) text of any number of tables, with or without counters (`-c`)."""
    tables: list[Table] = []
    name: str | None = None
    order: list[str] = []
    policies: dict[str, str] = {}
    rules: dict[str, list[str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name, order, policies, rules = line[1:], [], {}, {}
        elif name is None:
            raise KernelStateError(f"{family} save, line {number}: {line[:80]!r} outside a table (no `*filter` before it)")
        elif line == "COMMIT":
            tables.append(Table(family, name, tuple(Chain(c, policies[c], tuple(rules[c])) for c in order)))
            name = None
        elif line.startswith(":"):
            chain, _, policy = _COUNTERS.sub("", line[1:]).partition(" ")
            order.append(chain)
            policies[chain], rules[chain] = policy.strip() or "-", []
        else:
            rule = _RULE_COUNTERS.sub("", line)
            parts = rule.split(maxsplit=2)
            if len(parts) < 2 or parts[0] != "-A":
                raise KernelStateError(f"{family} save, line {number}: {line[:80]!r} is not a rule (`-A CHAIN …`)")
            if parts[1] not in rules:  # a chain used before it is declared: keep it rather than lose the rule
                order.append(parts[1])
                policies[parts[1]], rules[parts[1]] = "-", []
            rules[parts[1]].append(rule)
    if name is not None:
        raise KernelStateError(f"{family} save: table {name} has no COMMIT (the output was cut short)")
    return tuple(tables)


def parse_sets(text: str) -> tuple[IpSet, ...]:
    """`ipset save` text: every set, its definition and its members (whatever the set's options)."""
    definitions: dict[str, str] = {}
    members: dict[str, set[str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=2)
        if len(parts) < 2 or parts[0] not in ("create", "add"):
            raise KernelStateError(f"ipset save, line {number}: {line[:80]!r} is neither `create` nor `add`")
        if parts[0] == "create":
            definitions[parts[1]] = _INITVAL.sub("", line)
            members.setdefault(parts[1], set())
        else:
            if parts[1] not in definitions:
                raise KernelStateError(f"ipset save, line {number}: member of {parts[1]} before its `create`")
            members[parts[1]].add(parts[2] if len(parts) > 2 else "")
    return tuple(IpSet(n, definitions[n], frozenset(members[n])) for n in sorted(definitions))


def read(ipv4: str, ipv6: str, sets: str) -> KernelState:
    """The canonical form of one kernel's iptables-save, ip6tables-save and ipset save output."""
    return KernelState(parse_tables(ipv4, "IPv4") + parse_tables(ipv6, "IPv6"), parse_sets(sets))


def read_saved(text: str) -> KernelState:
    """The canonical form of what SAVE_SH printed."""
    ipv4, marker, rest = text.partition("#=ipv6\n")
    ipv6, marker2, sets = rest.partition("#=sets\n")
    if not marker or not marker2:
        raise KernelStateError("the save lacks its `#=ipv6` or `#=sets` marker: not the output of kernelstate.SAVE_SH")
    return read(ipv4, ipv6, sets)
