"""A strict reader of iptables-save / ip6tables-save text and of `ipset save` / `ipset restore` text.

It reads what enclave renders and what the kernel prints back, and models every word of the filter table that
can change a verdict. What it does not model it refuses, naming the line: a proof over a rule it skipped would
be a proof of something else.

Pure logic: no I/O beyond the text it is given.
"""

from __future__ import annotations

import ipaddress
import shlex
import socket
from dataclasses import dataclass, field
from typing import Any

BUILTIN_TARGETS = ("ACCEPT", "DROP", "REJECT", "RETURN", "LOG")
TERMINAL = ("ACCEPT", "DROP", "REJECT")
STATES = ("NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED")
# conntrack's virtual states: the connection's address was rewritten (DNAT: a published container port). Parsed
# for ENCLAVE-FORWARD, which the proofs do not reach (engine.py refuses them in a chain INPUT/OUTPUT reaches).
NAT_STATES = ("DNAT", "SNAT")
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58, "6": 6, "17": 17, "1": 1, "58": 58}
PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp"}
ICMP_TYPES = {
    "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5, "echo-request": 8,
    "router-advertisement": 9, "router-solicitation": 10, "time-exceeded": 11, "parameter-problem": 12,
    "timestamp-request": 13, "timestamp-reply": 14, "address-mask-request": 17, "address-mask-reply": 18,
}
ICMPV6_TYPES = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3, "parameter-problem": 4,
    "echo-request": 128, "echo-reply": 129, "router-solicitation": 133, "router-advertisement": 134,
    "neighbour-solicitation": 135, "neighbor-solicitation": 135, "neighbour-advertisement": 136,
    "neighbor-advertisement": 136, "redirect": 137,
}
# Tables other than filter see INPUT/OUTPUT packets too (raw can untrack them, mangle and nat can drop or
# rewrite them): such a table is accepted only empty of rules.
OTHER_TABLES = ("raw", "mangle", "nat", "security")


class ParseError(ValueError):
    """Bad or unmodelled input: names the file, the line number and the line."""

    def __init__(self, source: str, line: int, text: str, why: str) -> None:
        self.source, self.line, self.text, self.why = source, line, text, why
        super().__init__(f"{source}:{line}: {why}: {text[:200]}")


@dataclass(frozen=True)
class Cond:
    """One test a rule makes: kind, its argument, and whether it is negated with `!`."""

    kind: str  # iface_in iface_out src dst proto dport sport icmp state hl; forwarding only: nat origdport
    arg: Any  # an interface, ((low, high), 'net') or (name, 'set'), a protocol, port ranges, states, (op, hop)
    negate: bool = False


@dataclass(frozen=True)
class Rule:
    chain: str
    line: int
    text: str
    conds: tuple[Cond, ...]
    target: str
    goto: bool = False
    comment: str = ""


@dataclass
class Table:
    """The filter table of one family: chain policies (None for user chains), rules in order."""

    family: int
    source: str
    policies: dict[str, str | None] = field(default_factory=dict)
    policy_lines: dict[str, int] = field(default_factory=dict)
    rules: dict[str, list[Rule]] = field(default_factory=dict)
    live: bool = False  # printed by *-save (the kernel's state), not rendered by enclave

    def set_names(self) -> set[str]:
        return {str(c.arg[0]) for rs in self.rules.values() for r in rs for c in r.conds
                if c.kind in ("src", "dst") and isinstance(c.arg, tuple) and c.arg[1] == "set"}


@dataclass(frozen=True)
class IpSetDef:
    name: str
    kind: str
    family: int
    members: tuple[tuple[int, int], ...]  # [low, high) intervals of addresses
    line: int


def _ports(text: str, source: str, n: int, line: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        try:
            lo = int(low) if low else 0
            hi = int(high) if high else (65535 if _ else lo)
        except ValueError:
            raise ParseError(source, n, line, f"port {part!r} is not a number or a range like 1000:2000") from None
        if not (0 <= lo <= hi <= 65535):
            raise ParseError(source, n, line, f"port range {part!r} is outside 0-65535")
        out.append((lo, hi))
    return tuple(out)


def _network(text: str, family: int, source: str, n: int, line: str) -> tuple[int, int]:
    if family == 4 and "/" not in text:  # a set of 10 000 members: the common case, parsed strictly and fast
        try:
            addr = int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
            return addr, addr + 1
        except OSError:
            pass  # not a dotted quad: ipaddress says why below
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ParseError(source, n, line, f"{text!r} is not an address or a network") from None
    if net.version != family:
        raise ParseError(source, n, line, f"{text} is IPv{net.version} in an IPv{family} table")
    return int(net.network_address), int(net.broadcast_address) + 1


def _icmp_type(text: str, family: int, source: str, n: int, line: str) -> int:
    names = ICMP_TYPES if family == 4 else ICMPV6_TYPES
    if text in names:
        return names[text]
    if text.isdigit() and int(text) < 256:
        return int(text)
    raise ParseError(source, n, line, f"ICMP type {text!r} is not modelled (a type by name or number, no /code)")


def parse_rule(chain: str, words: list[str], family: int, source: str, n: int, line: str,
               chains: dict[str, str | None]) -> Rule:
    def refuse(why: str) -> ParseError:
        return ParseError(source, n, line, why)

    conds: list[Cond] = []
    target = ""
    goto = False
    comment = ""
    module = ""
    proto: int | None = None  # the protocol a -p names (None: any, or negated)
    limited = False
    negate = False
    i = 0

    def value() -> str:
        nonlocal i
        i += 1
        if i >= len(words):
            raise refuse(f"{words[i - 1]} needs a value")
        return words[i]

    while i < len(words):
        w = words[i]
        if w == "!":
            if negate:
                raise refuse("two ! in a row")
            negate = True
            i += 1
            continue
        neg, negate = negate, False
        if w in ("-i", "--in-interface", "-o", "--out-interface"):
            conds.append(Cond("iface_in" if w in ("-i", "--in-interface") else "iface_out", value(), neg))
        elif w in ("-s", "--source", "-d", "--destination"):
            text = value()
            if "," in text:
                raise refuse("several addresses in one -s/-d are not modelled (iptables-save prints one per rule)")
            conds.append(Cond("src" if w in ("-s", "--source") else "dst", (_network(text, family, source, n, line), "net"), neg))
        elif w in ("-p", "--protocol"):
            text = value().lower()
            if text not in PROTOCOLS:
                raise refuse(f"protocol {text!r} is not modelled (tcp, udp, icmp, ipv6-icmp)")
            conds.append(Cond("proto", PROTOCOLS[text], neg))
            proto = None if neg else PROTOCOLS[text]  # `! -p tcp -m tcp` is no tcp match: refused below
        elif w in ("-m", "--match"):
            module = value()
            if module not in ("tcp", "udp", "multiport", "icmp", "icmp6", "set", "conntrack", "state", "hl",
                              "comment", "limit"):
                raise refuse(f"match module {module!r} is not modelled")
            if module in ("tcp", "udp", "multiport") and (neg or proto not in (6, 17) or
                                                          (module != "multiport" and PROTOCOL_NAMES[proto] != module)):
                raise refuse(f"-m {module} needs -p tcp or -p udp before it (not negated)")
            if module == "icmp" and (proto != 1 or family != 4 or neg):
                raise refuse("-m icmp needs -p icmp in an IPv4 table")
            if module == "icmp6" and (proto != 58 or family != 6 or neg):
                raise refuse("-m icmp6 needs -p ipv6-icmp in an IPv6 table")
            if module == "limit":
                limited = True
        elif w in ("--dport", "--destination-port", "--sport", "--source-port") and module in ("tcp", "udp"):
            kind = "dport" if w in ("--dport", "--destination-port") else "sport"
            conds.append(Cond(kind, _ports(value(), source, n, line), neg))
        elif w in ("--dports", "--destination-ports", "--sports", "--source-ports") and module == "multiport":
            kind = "dport" if w in ("--dports", "--destination-ports") else "sport"
            conds.append(Cond(kind, _ports(value(), source, n, line), neg))
        elif w == "--icmp-type" and module == "icmp" or w == "--icmpv6-type" and module == "icmp6":
            conds.append(Cond("icmp", _icmp_type(value(), family, source, n, line), neg))
        elif w == "--match-set" and module == "set":
            name = value()
            flags = value()
            if flags not in ("src", "dst"):
                raise refuse(f"--match-set {name} {flags}: only one direction, src or dst, is modelled")
            conds.append(Cond(flags, (name, "set"), neg))
        elif w in ("--ctstate", "--state") and module == ("conntrack" if w == "--ctstate" else "state"):
            states = frozenset(value().split(","))
            unknown = states - set(STATES) - set(NAT_STATES)
            if unknown:
                raise refuse(f"conntrack state {', '.join(sorted(unknown))} is not modelled ({', '.join(STATES + NAT_STATES)})")
            if states & set(NAT_STATES) and states - set(NAT_STATES):
                raise refuse("a conntrack state list mixing DNAT/SNAT with real states is not modelled")
            conds.append(Cond("nat" if states <= set(NAT_STATES) else "state", states, neg))
        elif w == "--ctorigdstport" and module == "conntrack":
            conds.append(Cond("origdport", _ports(value(), source, n, line), neg))
        elif w in ("--hl-eq", "--hl-lt", "--hl-gt") and module == "hl":
            try:
                hop = int(value())
            except ValueError:
                raise refuse(f"{w} needs a number") from None
            if family != 6:
                raise refuse("-m hl is IPv6 only")
            conds.append(Cond("hl", (w[-2:], hop), neg))
        elif w == "--comment" and module == "comment":
            comment = value()
        elif w in ("--limit", "--limit-burst") and module == "limit":
            value()
        elif w in ("-j", "--jump", "-g", "--goto"):
            if neg:
                raise refuse("! before a target")
            target = value()
            goto = w in ("-g", "--goto")
            if target not in BUILTIN_TARGETS and target not in chains:
                raise refuse(f"target {target!r} is neither a modelled target ({', '.join(BUILTIN_TARGETS)}) nor a chain of this table")
            if target in chains and chains[target] is not None:
                raise refuse(f"a jump to the built-in chain {target}")
            if goto and target not in chains:
                raise refuse("-g needs a user chain")
        elif target == "LOG" and w in ("--log-prefix", "--log-level"):
            value()
        elif target == "LOG" and w in ("--log-tcp-sequence", "--log-tcp-options", "--log-ip-options", "--log-uid"):
            pass
        elif target == "REJECT" and w == "--reject-with":
            value()
        else:
            raise refuse(f"{w!r} is not modelled here" + (f" (after -m {module})" if module else ""))
        i += 1
    if negate:
        raise refuse("a trailing !")
    if not target:
        raise refuse("a rule without -j or -g (a counting rule) is not modelled")
    # A rate limit makes a rule match some packets of a class and not others. On LOG it changes nothing (LOG
    # never decides); on anything else the verdict depends on the rate, which no proof over packets can give.
    if limited and target != "LOG":
        raise refuse(f"-m limit on a rule that jumps to {target}: whether it matches depends on the packet rate")
    if chain == "INPUT" and any(c.kind == "iface_out" for c in conds) or chain == "OUTPUT" and any(c.kind == "iface_in" for c in conds):
        raise refuse(f"{'-o' if chain == 'INPUT' else '-i'} in {chain}: iptables refuses it")
    return Rule(chain, n, line, tuple(conds), target, goto, comment)


def parse_tables(text: str, family: int, source: str) -> Table:
    """The filter table of one iptables-save / iptables-restore text (other tables must be empty)."""
    table = Table(family, source)
    table.live = "# Generated by ip" in text
    current = ""
    seen: set[str] = set()
    pending: list[tuple[int, str, str, list[str]]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):  # iptables-save -c prints counters first: [packets:bytes] -A ...
            line = line.split("]", 1)[1].strip() if "]" in line else line
        if line.startswith("*"):
            if current:
                raise ParseError(source, n, raw, f"table {line[1:]} begins before *{current} was COMMITted")
            current = line[1:]
            if current != "filter" and current not in OTHER_TABLES:
                raise ParseError(source, n, raw, f"unknown table {current!r}")
            if current in seen:
                raise ParseError(source, n, raw, f"table {current} appears twice")
            seen.add(current)
            continue
        if not current:
            raise ParseError(source, n, raw, "a line outside any *table ... COMMIT block")
        if line == "COMMIT":
            current = ""
            continue
        if current != "filter":
            if line.startswith(":"):
                continue  # chains and policies of raw/mangle/nat/security: ACCEPT unless they hold rules
            raise ParseError(source, n, raw, f"a rule in table {current}: it can change INPUT/OUTPUT verdicts "
                             "(untrack, mark, rewrite or drop) and is not modelled"
                             + ("; a DNAT rewrites packets before INPUT sees them, so a proof of the filter table "
                                "is of the rewritten packets: to prove it alone, save it alone (iptables-save -t "
                                "filter), as enclave audit does" if current == "nat" else ""))
        if line.startswith(":"):
            parts = line[1:].split()
            if len(parts) < 2:
                raise ParseError(source, n, raw, "a chain line is `:NAME POLICY [packets:bytes]`")
            name, policy = parts[0], parts[1]
            if name in table.policies:
                raise ParseError(source, n, raw, f"chain {name} declared twice")
            builtin = name in ("INPUT", "FORWARD", "OUTPUT")
            if builtin and policy not in ("ACCEPT", "DROP"):
                raise ParseError(source, n, raw, f"policy {policy!r} of {name} (ACCEPT or DROP)")
            if not builtin and policy != "-":
                raise ParseError(source, n, raw, f"user chain {name} with policy {policy!r} (it is -)")
            table.policies[name] = policy if builtin else None
            table.policy_lines[name] = n
            table.rules[name] = []
            continue
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise ParseError(source, n, raw, f"unbalanced quoting ({exc})") from None
        if len(words) < 2 or words[0] not in ("-A", "--append"):
            raise ParseError(source, n, raw, "only `-A CHAIN ...` rules are modelled in a save file")
        pending.append((n, raw, words[1], words[2:]))
    if current:
        raise ParseError(source, len(text.splitlines()), "", f"table {current} has no COMMIT")
    if "filter" not in seen:
        raise ParseError(source, 1, text.splitlines()[0] if text else "", "no *filter table")
    for name in ("INPUT", "FORWARD", "OUTPUT"):
        if name not in table.policies:  # iptables-restore --noflush keeps what exists; a save names all three
            table.policies[name] = "ACCEPT"
            table.policy_lines[name] = 0
            table.rules[name] = []
    # A rule the verifier does not model is refused only where INPUT or OUTPUT can reach it: FORWARD and the
    # chains only it reaches (a Docker host's DOCKER, DOCKER-ISOLATION-*) decide no packet the proof is about.
    unmodelled: dict[str, ParseError] = {}
    for n, raw, chain, words in pending:
        if chain not in table.rules:
            raise ParseError(source, n, raw, f"chain {chain} is not declared (`:{chain} - [0:0]`)")
        try:
            rule = parse_rule(chain, words, family, source, n, raw.strip(), table.policies)
        except ParseError as exc:
            unmodelled.setdefault(chain, exc)
            target = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "--jump", "-g", "--goto")), "")
            # a stand-in that keeps the jump (for what is reached), refused below if its chain is reached
            rule = Rule(chain, n, raw.strip(), (), target if target in table.rules else "LOG")
        table.rules[chain].append(rule)
    # a rendered file's ENCLAVE-INPUT/OUTPUT are reached through the jumps the push places (engine.with_push_jumps)
    reached = _reached(table, ("INPUT", "OUTPUT") if table.live else ("INPUT", "OUTPUT", "ENCLAVE-INPUT", "ENCLAVE-OUTPUT"))
    refused = [exc for chain, exc in unmodelled.items() if chain in reached]
    if refused:
        raise min(refused, key=lambda exc: exc.line)
    _refuse_loops(table)
    return table


def _reached(table: Table, hooks: tuple[str, ...]) -> set[str]:
    """The chains a packet in these hooks can traverse."""
    seen: set[str] = set()
    todo = list(hooks)
    while todo:
        chain = todo.pop()
        if chain in seen or chain not in table.rules:
            continue
        seen.add(chain)
        todo += [r.target for r in table.rules[chain] if r.target in table.rules]
    return seen


def _refuse_loops(table: Table) -> None:
    done: set[str] = set()

    def visit(chain: str, path: tuple[str, ...]) -> None:
        if chain in path:
            first = next(r for r in table.rules[path[-1]] if r.target == chain)
            raise ParseError(table.source, first.line, first.text, f"chains jump in a loop: {' -> '.join(path + (chain,))}")
        if chain in done:
            return
        for r in table.rules[chain]:
            if r.target in table.rules:
                visit(r.target, path + (chain,))
        done.add(chain)

    for chain in table.rules:
        visit(chain, ())


def parse_ipsets(text: str, source: str) -> dict[str, IpSetDef]:
    """`ipset save` output or an `ipset restore` file: create, add, del, flush, swap, destroy, in order."""
    sets: dict[str, IpSetDef] = {}
    members: dict[str, list[tuple[int, int]]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        op = words[0]
        if op in ("-exist", "-!"):
            words, op = words[1:], words[1] if len(words) > 1 else ""
        words = [w for w in words if w not in ("-exist", "-!")]

        def refuse(why: str) -> ParseError:
            return ParseError(source, n, raw, why)

        if len(words) < 2:
            raise refuse("an ipset command needs a set name")
        name = words[1]
        if op in ("create", "-N", "n"):
            if len(words) < 3:
                raise refuse("create needs a type")
            kind = words[2]
            if kind not in ("hash:ip", "hash:net"):
                raise refuse(f"set type {kind!r} is not modelled (hash:ip, hash:net)")
            opts = words[3:]
            family = 4
            j = 0
            while j < len(opts):
                if opts[j] == "family" and j + 1 < len(opts):
                    if opts[j + 1] not in ("inet", "inet6"):
                        raise refuse(f"family {opts[j + 1]!r} (inet or inet6)")
                    family = 4 if opts[j + 1] == "inet" else 6
                    j += 2
                elif opts[j] in ("hashsize", "maxelem", "bucketsize", "initval", "netmask") and j + 1 < len(opts):
                    if opts[j] == "netmask":
                        raise refuse("netmask sets are not modelled")
                    j += 2
                else:
                    raise refuse(f"set option {opts[j]!r} is not modelled (timeouts, counters, comments change membership or need care)")
            if name in sets:
                if (sets[name].kind, sets[name].family) != (kind, family):
                    raise refuse(f"set {name} created again with another type or family")
                continue  # -exist: creating an existing set of the same type changes nothing
            sets[name] = IpSetDef(name, kind, family, (), n)
            members[name] = []
        elif op in ("add", "-A", "a", "del", "-D", "d"):
            if name not in sets:
                raise refuse(f"set {name} is used before it is created")
            if len(words) != 3:
                raise refuse("an element with options (timeout, nomatch, comment) is not modelled")
            member = words[2]
            fam = sets[name].family
            if "-" in member:
                low, _, high = member.partition("-")
                try:
                    lo_a, hi_a = ipaddress.ip_address(low), ipaddress.ip_address(high)
                except ValueError:
                    raise refuse(f"{member!r} is not an address range") from None
                if lo_a.version != fam or hi_a.version != fam or int(lo_a) > int(hi_a):
                    raise refuse(f"{member!r}: not an IPv{fam} range low-high")
                interval = (int(lo_a), int(hi_a) + 1)
            else:
                interval = _network(member, fam, source, n, raw)
            if op in ("add", "-A", "a"):
                members[name].append(interval)
            else:
                members[name] = _subtract(members[name], interval)
        elif op in ("flush", "-F", "f"):
            if name not in sets:
                raise refuse(f"set {name} is flushed before it is created")
            members[name] = []
        elif op in ("swap", "-W", "w"):
            if len(words) != 3 or name not in sets or words[2] not in sets:
                raise refuse("swap needs two existing sets")
            other = words[2]
            members[name], members[other] = members[other], members[name]
            a, b = sets[name], sets[other]
            sets[name] = IpSetDef(name, b.kind, b.family, (), a.line)
            sets[other] = IpSetDef(other, a.kind, a.family, (), b.line)
        elif op in ("destroy", "-X", "x"):
            sets.pop(name, None)
            members.pop(name, None)
        else:
            raise refuse(f"ipset command {op!r} is not modelled")
    return {name: IpSetDef(name, s.kind, s.family, tuple(members[name]), s.line) for name, s in sets.items()}


def _subtract(intervals: list[tuple[int, int]], cut: tuple[int, int]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in intervals:
        if hi <= cut[0] or lo >= cut[1]:
            out.append((lo, hi))
            continue
        if lo < cut[0]:
            out.append((lo, cut[0]))
        if hi > cut[1]:
            out.append((cut[1], hi))
    return out
