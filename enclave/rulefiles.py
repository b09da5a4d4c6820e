"""A host's rule files, the names of enclave's chains, and nothing else: what the push run needs to import.

`python -m enclave.pushrun` starts once per host in every `pulumi up` (and in every lab push): it must not pull in
the stack schema (pydantic) and the compiler, which cost about a second of start-up each time. enclave.render
builds these files and re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAIN_PREFIX = "ENCLAVE"
INPUT_CHAIN = f"{CHAIN_PREFIX}-INPUT"
OUTPUT_CHAIN = f"{CHAIN_PREFIX}-OUTPUT"
# What the host forwards to its own containers (Docker's published ports): hooked from DOCKER-USER (render.py).
FORWARD_CHAIN = f"{CHAIN_PREFIX}-FORWARD"


@dataclass(frozen=True)
class RuleFiles:
    """Everything a host needs; rendered text is exactly what lands on the host."""

    host: str
    ipv4: str
    ipv6: str
    ipsets: str
    set_names: tuple[str, ...]
    # The hosts whose addresses these files contain: the only addresses a host's push depends on, so the
    # Pulumi program re-pushes a host exactly when one of these changes.
    peers: tuple[str, ...] = ()

    @property
    def rule_count(self) -> int:
        return sum(line.startswith("-A ") for text in (self.ipv4, self.ipv6) for line in text.splitlines())
