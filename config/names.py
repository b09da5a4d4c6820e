"""Names enclave gives things on a host, decided here so the schema can refuse a stack whose names would collide.

ipset names are at most 31 characters; a set lands on a host as `<name>.<generation>` (enclave.ipsets: a dot and
3 characters), so a set name is at most 27. A role's set is `enclave-<role>` when that fits. A longer role gets
its first 12 characters, an underscore and 6 hex digits of its name's SHA-256: a role name cannot hold `_`, so a hashed name can never
equal a verbatim one (`abcdefghijkl-dd65ee` is a valid role name; `abcdefghijkl_dd65ee` is not). The operator
sets are `enclave-operators` (`operators` is a reserved role name) and `enclave-operators_v6` (with `_`, so a
role named `operators6` or `operators-v6` keeps its own set).

Two long roles whose names share their first 12 characters and whose hashes share 24 bits would still collide;
`set_name_collisions` finds that (and any other clash) and the schema refuses the stack naming both roles.
Chains are fixed (`ENCLAVE-INPUT`, `ENCLAVE-OUTPUT`) and comments only explain a rule, so neither can collide.

For users: docs/stack-file.md#how-the-rules-look.
"""

from __future__ import annotations

import hashlib

SET_PREFIX = "enclave-"
# ipset names are at most 31 characters; keep room for the generation suffix (".k3x", enclave.ipsets).
SET_NAME_MAX = 27
HASH_DIGITS = 6
OPERATORS_SET = {4: SET_PREFIX + "operators", 6: SET_PREFIX + "operators_v6"}


def set_name(role: str) -> str:
    """The ipset holding a role's private addresses on every host that admits it or sends to it."""
    name = SET_PREFIX + role
    if len(name) <= SET_NAME_MAX:
        return name
    digest = hashlib.sha256(role.encode()).hexdigest()[:HASH_DIGITS]
    return f"{SET_PREFIX}{role[: SET_NAME_MAX - len(SET_PREFIX) - HASH_DIGITS - 1]}_{digest}"


def set_name_collisions(roles: list[str]) -> list[tuple[str, str, str]]:
    """(set name, first key, second key) for every set name two things would share; keys as in the stack file."""
    owners: dict[str, str] = {name: "operators" for name in OPERATORS_SET.values()}
    clashes = []
    for role in roles:
        name = set_name(role)
        key = f"roles.{role}"
        if name in owners:
            clashes.append((name, owners[name], key))
        else:
            owners[name] = key
    return clashes
