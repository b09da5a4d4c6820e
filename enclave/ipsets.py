"""ipset text, written and read in one place: the generation names sets land under, and the one parser of
`ipset restore` files (as enclave renders them) and `ipset save` output (as a host prints it).

A set lands on a host as `<base>.<generation>` (`enclave-wordpress.k3x`): the generation is a short hash of the
set's definition and members, so a set with other members is a new set beside the live one, and the rules
switch to it in one iptables-restore transaction (enclave.push, "one change at a time").
"""

from __future__ import annotations

import hashlib
import re

GENERATION_CHARS = 3  # a base name is at most 27 characters (config.names) + "." + 3 = 31, ipset's limit
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def generation(definition: str, members: tuple[str, ...] | list[str]) -> str:
    """The generation of a set: base36 of a SHA-256 of its definition (`hash:ip family inet`) and members."""
    h = int.from_bytes(hashlib.sha256("\n".join([definition, *sorted(members)]).encode()).digest()[:8], "big")
    chars = []
    for _ in range(GENERATION_CHARS):
        h, r = divmod(h, 36)
        chars.append(_BASE36[r])
    return "".join(chars)


def landed_name(base: str, definition: str, members: tuple[str, ...] | list[str]) -> str:
    return f"{base}.{generation(definition, members)}"


def base_name(name: str) -> str:
    """`enclave-wordpress.k3x` -> `enclave-wordpress`: the set whatever its members (a name without one stays)."""
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and len(suffix) == GENERATION_CHARS else name


_MATCH_SET_GENERATION = re.compile(rf"(--match-set \S+)\.[0-9a-z]{{{GENERATION_CHARS}}}(?= )")


def without_generations(rules: str) -> str:
    """Rules with each `--match-set` naming the set's base name: what stays when only members change."""
    return _MATCH_SET_GENERATION.sub(r"\1", rules)


def parse_ipsets(text: str, prefix: str = "") -> dict[str, tuple[str, tuple[str, ...]]]:
    """`create`/`add` lines -> {set name: (definition, members)}, for the sets whose name starts with prefix.

    Reads enclave's rendered files and `ipset save` alike: other lines (comments) are skipped; a member is the
    rest of its `add` line (`10.0.0.1`, or `10.0.0.1 timeout 30` as ipset saves it)."""
    types: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or not words[1].startswith(prefix):
            continue
        if words[0] == "create":
            types[words[1]] = " ".join(w for w in words[2:] if w != "-exist")
            members.setdefault(words[1], [])
        elif words[0] == "add" and len(words) > 2:
            members.setdefault(words[1], []).append(" ".join(words[2:]))
    return {name: (types.get(name, ""), tuple(found)) for name, found in members.items()}
