"""`enclave prove`, `enclave explain` and `enclave reach`: the verifier on the command line.

Exit codes as the rest of the CLI: 0 proved (or a verdict given), 1 counterexamples (the rules and the policy
disagree), 2 bad input (a stack, a flag, or a rule file the verifier does not model, naming the line).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from config.schema import PortSpec, StackError, StackIssue
from config.stackfile import Stack

from ..compiler import Addresses, Endpoint, Flow, Host, Interface, Policy, arrival_interface, decide, egress_verdict
from ..plan import build_plan, endpoints_for, load_addresses, outsiders
from .engine import Packet, VerifyError, keys_at, table_regions, traverse, with_push_jumps
from .parse import ParseError, parse_ipsets, parse_tables
from .prove import HostProof, HostText, Prover

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
SHOWN = 5  # counterexamples printed per host in text form (all of them, up to 20, in json)
LISTED_HOSTS = 50  # up to this many hosts, each proved one gets its own line
RULE_FILES = ("rules.v4", "rules.v6", "ipsets")

StackLoader = Callable[[argparse.Namespace], Stack]


def register(sub: Any, add_stack_arguments: Callable[[argparse.ArgumentParser], None], addresses_help: str,
             stack_from_args: StackLoader) -> None:
    prove = sub.add_parser(
        "prove", help="prove every host's rules equal to the policy, for every packet (offline)",
        description="Prove each host's rule files equal to what the stack declares, for every packet: every "
        "interface, address, protocol, port, ICMP type and conntrack state. Without --rules, the files the stack "
        "renders; with --rules DIR, DIR/<host>/rules.v4, rules.v6 and ipsets (as rendered, or as iptables-save, "
        "ip6tables-save and ipset save print them on a host). Exit 1 with counterexample packets.",
    )
    add_stack_arguments(prove)
    prove.add_argument("--addresses", type=Path, help=addresses_help)
    prove.add_argument("--rules", type=Path, metavar="DIR", help="prove DIR/<host>/{rules.v4,rules.v6,ipsets}")
    prove.add_argument("--host", help="prove this host only (e.g. mysql-1)")
    prove.add_argument("--format", choices=("text", "json"), default="text", help="json: the same, for scripts")
    prove.set_defaults(func=lambda args, console: cmd_prove(args, console, stack_from_args(args)))

    explain = sub.add_parser(
        "explain", help="why a packet is allowed or denied: the declaration and the rule line",
        description="The verdict on a new connection from SRC to DST on PORT, the stack declaration that decides "
        "it, and the rule line on DST that does. SRC: a host, a role's first host, internet, operators, neighbor "
        "or an address; DST: a host; PORT: tcp/3306, udp/53 or icmp.",
    )
    add_stack_arguments(explain)
    explain.add_argument("--addresses", type=Path, help=addresses_help)
    explain.add_argument("--format", choices=("text", "json"), default="text", help="json: the same, for scripts")
    explain.add_argument("src", metavar="SRC")
    explain.add_argument("dst", metavar="DST")
    explain.add_argument("port", metavar="PORT")
    explain.set_defaults(func=lambda args, console: cmd_explain(args, console, stack_from_args(args)))

    reach = sub.add_parser(
        "reach", help="the blast radius of a host: everything it can open, grouped",
        description="Every (role, hosts, port, interface) HOST can open a new connection to: what an attacker on "
        "HOST reaches. Proved equal to the rules by `enclave prove`.",
    )
    add_stack_arguments(reach)
    reach.add_argument("--addresses", type=Path, help=addresses_help)
    reach.add_argument("--format", choices=("text", "json"), default="text", help="json: the same, for scripts")
    reach.add_argument("host", metavar="HOST")
    reach.set_defaults(func=lambda args, console: cmd_reach(args, console, stack_from_args(args)))


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _bad(key: str, message: str) -> StackError:
    return StackError([StackIssue(key, message)], key)


def _read(path: Path, key: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(key, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}; --rules DIR holds "
                   "DIR/<host>/rules.v4, rules.v6 and ipsets") from None


def _texts(args: argparse.Namespace, hosts: list[str], rendered: dict[str, HostText]) -> list[HostText]:
    if args.rules is None:
        return [rendered[h] for h in hosts]
    if not os.path.isdir(args.rules):
        raise _bad("--rules", f"{args.rules} is not a directory; give DIR holding DIR/<host>/rules.v4, rules.v6, ipsets")
    present = [h for h in hosts if os.path.isdir(args.rules / h)]
    if not present:
        raise _bad("--rules", f"{args.rules} holds no directory of a host of the stack (e.g. {args.rules}/{hosts[0]})")
    out = []
    for h in present:
        parts = [_read(args.rules / h / name, "--rules") for name in RULE_FILES]
        out.append(HostText(h, parts[0], parts[1], parts[2], str(args.rules / h)))
    return out


def cmd_prove(args: argparse.Namespace, console: Console, stack: Stack) -> int:
    started = time.perf_counter()
    addresses = load_addresses(args.addresses, _policy(stack)) if args.addresses else None
    plan = build_plan(stack, addresses)
    hosts = list(plan.files)
    if args.host is not None:
        if args.host not in plan.files:
            raise _bad("--host", f"{args.host!r} is no host of stack {stack.name}; hosts are {', '.join(hosts[:10])}")
        hosts = [args.host]
    texts = _texts(args, hosts, {h: HostText.of(f) for h, f in plan.files.items()})
    prover = Prover(plan.policy, plan.addresses)
    proofs = [_prove(prover, t) for t in texts]
    seconds = time.perf_counter() - started
    failed = [p for p in proofs if not p.proved]
    if args.format == "json":
        sys.stdout.write(json.dumps({"stack": stack.name, "proved": not failed, "seconds": round(seconds, 3),
                                     "hosts": [p.as_json() for p in proofs]}, indent=2) + "\n")
        return EXIT_FAILED if failed else EXIT_OK
    what = f"the files in {args.rules}" if args.rules else "the rendered files"
    listed = len(proofs) <= LISTED_HOSTS  # a fleet of thousands gets its failures and a summary, not a line each
    for p in proofs:
        if p.proved:
            if listed:
                _say(console, f"{p.host}: proved, {p.atoms} classes of packets" + (" (same files as a host above)" if p.cached else ""))
            continue
        _say(console, f"{p.host}: NOT proved: {p.disagreeing} of {p.atoms} classes of packets differ from the policy, e.g.")
        for d in p.differences[:SHOWN]:
            _say(console, f"  - {d.describe()}")
    distinct = sum(not p.cached for p in proofs)
    if failed:
        _say(console, f"stack {stack.name}: {len(failed)} of {len(proofs)} host(s) differ from the policy ({what})")
        return EXIT_FAILED
    _say(console, f"stack {stack.name}: all {len(proofs)} hosts proved equal to the policy for every packet ({what}; "
        f"{distinct} distinct file sets, {seconds:.2f} s)")
    return EXIT_OK


def _prove(prover: Prover, text: HostText) -> HostProof:
    try:
        return prover.prove(text)
    except ParseError as exc:
        raise _bad(exc.source, f"line {exc.line}: {exc.why}: {exc.text[:200]}") from None
    except VerifyError as exc:
        raise _bad(text.where, str(exc)) from None


def _policy(stack: Stack) -> Policy:
    from ..compiler import compile_policy

    return compile_policy(stack.config)


# -------------------------------------------------------------------------------------------- explain


@dataclass(frozen=True)
class Explanation:
    src: str
    dst: str
    port: PortSpec
    interface: Interface
    family: int
    address: str
    flow: Flow | None
    rule_verdict: str
    rule_line: int
    rule_text: str

    @property
    def verdict(self) -> str:
        return "allow" if self.flow else "deny"

    @property
    def agrees(self) -> bool:
        return (self.rule_verdict == "ACCEPT") == (self.flow is not None)

    def as_json(self) -> dict[str, Any]:
        return {"from": self.src, "to": self.dst, "port": str(self.port), "interface": self.interface,
                "family": self.family, "sourceAddress": self.address, "verdict": self.verdict,
                "declaration": self.flow.why if self.flow else "default drop", "rules": self.rule_verdict,
                "ruleLine": self.rule_line, "rule": self.rule_text, "agrees": self.agrees}


def _source(policy: Policy, stack_name: str, text: str, addresses: dict[str, Addresses], dst: Host) -> Endpoint:
    others = outsiders(policy.stack, addresses)
    if text in ("internet", "operators", "neighbor") or text in policy.host_by_name:
        return endpoints_for(text, policy, others, addresses)[0]
    if text in policy.stack.roles:  # the role's first host other than the destination (itself is loopback)
        candidates = endpoints_for(text, policy, others, addresses)
        return next((e for e in candidates if e.name != dst.name), candidates[0])
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise _bad("SRC", f"{text!r} is no host, role, internet, operators, neighbor or address of stack "
                   f"{stack_name}") from None
    owner = next((h for h, a in addresses.items() if a.private == str(addr)), None)
    if owner is not None:
        return Endpoint("host", owner, addresses[owner].public, addresses[owner].public6)
    if addr.version == 4 and addr in policy.stack.vpc_ip_range:
        return Endpoint("neighbor", str(addr), str(addr))
    return Endpoint("internet", str(addr), str(addr) if addr.version == 4 else None,
                    str(addr) if addr.version == 6 else None)


def explain(stack: Stack, src_text: str, dst_text: str, port_text: str,
            addresses: dict[str, Addresses] | None = None) -> Explanation:
    plan = build_plan(stack, addresses)
    policy = plan.policy
    dst = policy.host_by_name.get(dst_text)
    if dst is None:
        raise _bad("DST", f"{dst_text!r} is no host of stack {stack.name}; e.g. {policy.hosts[0].name}")
    try:
        port = PortSpec.parse(port_text)
    except ValueError as exc:
        raise _bad("PORT", str(exc)) from None
    if port.low != port.high:
        raise _bad("PORT", f"{port}: one port, e.g. {port.proto}/{port.low}")
    src = _source(policy, stack.name, src_text, plan.addresses, dst)
    interface = arrival_interface(src)
    family = 6 if src.kind == "internet" and src.address is None else 4
    flow = decide(policy, src, dst, port, interface, family)
    if interface == "private":
        address = plan.addresses[src.name].private if src.kind == "host" else str(src.address)
    else:
        address = str(src.address if family == 4 else src.address6)
    files = plan.files[dst.name]
    table = with_push_jumps(parse_tables(files.ipv4 if family == 4 else files.ipv6, family, f"{dst.name}/rules.v{family}"))
    src_regions, _ = table_regions(table, parse_ipsets(files.ipsets, f"{dst.name}/ipsets"))
    stack_config = policy.stack
    # a host of a `public: false` role has no public interface: a packet from outside can arrive on none of its
    # own (its eth0 is its private one), so it is shown arriving on an interface no rule names
    iface = (stack_config.public_interface(dst.role) if interface == "public"
             else stack_config.private_interface(dst.role)) or "(none: public: false)"
    proto = {"tcp": 6, "udp": 17}.get(port.proto, 1 if family == 4 else 58)
    packet = Packet(iface, int(ipaddress.ip_address(address)),
                    0, proto, 0, port.low, -1 if port.proto != "icmp" else (8 if family == 4 else 128), "NEW",
                    64, keys_at(src_regions, int(ipaddress.ip_address(address))), frozenset())
    verdict, rule = traverse(table, "INPUT", packet)
    text = rule.text if rule else f":INPUT {table.policies['INPUT']} (the chain's policy)"
    line = rule.line if rule else table.policy_lines["INPUT"]
    return Explanation(src.name if src.kind == "host" else src_text, dst.name, port, interface, family, address,
                       flow, verdict, line, text)


def cmd_explain(args: argparse.Namespace, console: Console, stack: Stack) -> int:
    addresses = load_addresses(args.addresses, _policy(stack)) if args.addresses else None
    e = explain(stack, args.src, args.dst, args.port, addresses)
    if args.format == "json":
        sys.stdout.write(json.dumps(e.as_json(), indent=2) + "\n")
        return EXIT_OK if e.agrees else EXIT_FAILED
    _say(console, f"{e.src} -> {e.dst} {e.port}: {e.verdict}")
    _say(console, f"  packet:      new connection from {e.address} arriving on {e.dst}'s {e.interface} interface (IPv{e.family})")
    declared = (f"{e.flow.why} ({e.flow.source} -> {' '.join(map(str, e.flow.ports))} on the {e.flow.interface} interface)"
                if e.flow else "none admits it: the default drop")
    _say(console, f"  declaration: {declared}")
    where = f"line {e.rule_line}" if e.rule_line else "placed by the push"
    _say(console, f"  rule:        {e.dst} rules.v{e.family} {where}: {e.rule_text}")
    if not e.agrees:
        _say(console, f"  MISMATCH: the rules {e.rule_verdict} what the policy says is {e.verdict}")
        return EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- reach


@dataclass(frozen=True)
class Reach:
    role: str
    hosts: tuple[str, ...]
    port: PortSpec
    interface: str
    why: str


def reach(policy: Policy, addresses: dict[str, Addresses], name: str) -> list[Reach]:
    """Every (role, hosts, port, interface) host `name` can open (admitted there, and let out by its own egress);
    exact because `prove` proves rules == decide and egress_verdict."""
    me = policy.host_by_name[name]
    mine = addresses[name]
    sources = [("private", 4, Endpoint("host", name, mine.public, mine.public6)),
               ("public", 4, Endpoint("internet", name, mine.public, None))]
    if mine.public6:
        sources.append(("public", 6, Endpoint("internet", name, None, mine.public6)))
    out = []
    for role in policy.stack.roles:
        hosts = tuple(h.name for h in policy.hosts if h.role == role and h != me)
        if not hosts:
            continue
        ports = sorted({p for f in policy.flows_to_role[role] for p in f.ports}, key=lambda p: (p.proto, p.low, p.high))
        for interface, family, src in sources:
            for port in ports:
                dst = policy.host_by_name[hosts[0]]
                flow = decide(policy, src, dst, port, interface, family)  # type: ignore[arg-type]
                to = addresses[dst.name]
                address = to.private if interface == "private" else to.public if family == 4 else to.public6
                if flow is not None and egress_verdict(policy, me, address, dst, port, interface,  # type: ignore[arg-type]
                                                       family) is None:
                    flow = None  # admitted there, but this host's own egress allowlist does not let it out
                if flow is not None:
                    label = interface + (" IPv6" if family == 6 else "")
                    out.append(Reach(role, hosts, port, label, flow.why))
    return out


def cmd_reach(args: argparse.Namespace, console: Console, stack: Stack) -> int:
    addresses = load_addresses(args.addresses, _policy(stack)) if args.addresses else None
    plan = build_plan(stack, addresses)
    if args.host not in plan.policy.host_by_name:
        raise _bad("HOST", f"{args.host!r} is no host of stack {stack.name}; hosts are "
                   f"{', '.join(list(plan.policy.host_by_name)[:10])}")
    found = reach(plan.policy, plan.addresses, args.host)
    if args.format == "json":
        sys.stdout.write(json.dumps({"host": args.host, "reaches": [
            {"role": r.role, "hosts": list(r.hosts), "port": str(r.port), "interface": r.interface, "why": r.why}
            for r in found]}, indent=2) + "\n")
        return EXIT_OK
    me = plan.policy.host_by_name[args.host]
    _say(console, f"{args.host} (role {me.role}) can open new connections to:")
    groups: dict[tuple[str, str], list[Reach]] = {}
    for r in found:
        groups.setdefault((r.role, r.interface), []).append(r)
    for (role, interface), items in groups.items():
        hosts = items[0].hosts
        shown_hosts = ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else "")
        ports = ", ".join(f"{r.port} ({r.why})" for r in items)
        _say(console, f"  {role} [{shown_hosts}] via {interface}: {ports}")
    if not found:
        _say(console, "  nothing")
    return EXIT_OK


