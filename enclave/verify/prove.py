"""Prove hosts: each host's rule files (rendered or live) equal to the stack's intent for every packet.

Hosts whose files and intent are the same are proved once: a prod-shaped fleet of 10 000 hosts has a handful of
distinct (files, role) pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..compiler import Addresses, Policy
from ..rulefiles import RuleFiles
from .engine import Difference, compare
from .parse import parse_ipsets, parse_tables
from .spec import AddressIndex, HostIntent

HOOKS = ("INPUT", "OUTPUT")
# Comment lines (a title naming the host, a save's date) change no verdict: hosts of a role differ only there.
COMMENT_LINE = re.compile(r"(?m)^#.*$")


@dataclass
class HostProof:
    host: str
    atoms: int
    disagreeing: int = 0  # atoms (classes of packets) where rules and policy differ
    differences: list[Difference] = field(default_factory=list)  # the first of them, as packets
    cached: bool = False

    @property
    def proved(self) -> bool:
        return not self.differences

    def as_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "proved": self.proved,
            "atoms": self.atoms,
            "disagreeingAtoms": self.disagreeing,
            "counterexamples": [
                {
                    "family": d.family, "hook": d.hook, "packet": d.packet_text(),
                    "rules": "ACCEPT" if d.rules_accept else "DROP",
                    "ruleLine": d.rule.line if d.rule else d.policy_line,
                    "rule": d.rule.text if d.rule else f":{d.hook} policy",
                    "comment": d.rule.comment if d.rule else "",
                    "policy": "allow" if d.intent_accept else "deny",
                    "why": d.reason,
                }
                for d in self.differences
            ],
        }


@dataclass(frozen=True)
class HostText:
    """One host's three files as text (rendered, or as `iptables-save`, `ip6tables-save`, `ipset save` print)."""

    host: str
    rules_v4: str
    rules_v6: str
    ipsets: str
    where: str  # the directory or "rendered", for messages

    @staticmethod
    def of(files: RuleFiles) -> HostText:
        return HostText(files.host, files.ipv4, files.ipv6, files.ipsets, f"rendered {files.host}")


class Prover:
    """Proves hosts of one policy with one set of addresses; identical (files, intent) pairs are proved once."""

    def __init__(self, policy: Policy, addresses: dict[str, Addresses], limit: int = 20) -> None:
        self.policy, self.addresses, self.limit = policy, addresses, limit
        self._index: AddressIndex | None = None
        self._proofs: dict[tuple[object, ...], list[tuple[str, tuple[int, int, list[Difference]]]]] = {}

    def _intent_key(self, host: str) -> tuple[str, ...]:
        h = self.policy.host_by_name[host]
        key: tuple[str, ...] = (h.role,)
        if self.policy.stack.roles[h.role].egress == "restricted":  # the egress rules depend on the host itself
            key += tuple(f.why + f.role for f in self.policy.flows_from_host(h))
        return key

    def prove(self, text: HostText) -> HostProof:
        # Exact, and cheap for 10 000 hosts: set files (the large part) are bucketed by length and ends, then
        # compared whole (memcmp); hashing every host's set members would cost more than the proofs. Rule files
        # are small: their comments are dropped, since hosts of a role differ only there.
        ipsets = text.ipsets
        key = (COMMENT_LINE.sub("", text.rules_v4), COMMENT_LINE.sub("", text.rules_v6), len(ipsets),
               ipsets[:256], ipsets[-256:], self._intent_key(text.host))
        for known_ipsets, (atoms, wrong, known) in self._proofs.get(key, []):
            if known_ipsets == ipsets:
                return HostProof(text.host, atoms, wrong, known, cached=True)
        host = self.policy.host_by_name[text.host]
        if self._index is None:
            self._index = AddressIndex(self.policy, self.addresses)
        intent = HostIntent(self.policy, self.addresses, host, self._index)
        sets = parse_ipsets(text.ipsets, f"{text.where}/ipsets")
        atoms = wrong = 0
        diffs: list[Difference] = []
        for family, body, name in ((4, text.rules_v4, "rules.v4"), (6, text.rules_v6, "rules.v6")):
            table = parse_tables(body, family, f"{text.where}/{name}")
            for hook in HOOKS:
                n, bad, found = compare(table, hook, intent, sets, self.limit - len(diffs))
                atoms += n
                wrong += bad
                diffs += found
        self._proofs.setdefault(key, []).append((ipsets, (atoms, wrong, diffs)))
        return HostProof(text.host, atoms, wrong, diffs)
