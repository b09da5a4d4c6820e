"""The offline plan: hosts, addresses, flows, rule files and the stack's tests, before anything exists.

Addresses are inputs. Without real ones (from Pulumi outputs or `--addresses FILE.json`) the plan uses a
deterministic example inside the VPC range, which the lab also uses, so a plan and a lab run of one stack
speak of the same addresses.

For users: docs/cli.md#plan.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.schema import PolicyTest, PortSpec, StackConfig, StackError, StackIssue
from config.stackfile import Stack, read_bounded_text

from .compiler import Addresses, Endpoint, Host, Policy, arrival_interface, compile_policy, decide, egress_verdict
from .private import install_warnings
from .render import Renderer, RuleFiles

# Documentation/benchmark ranges (RFC 2544, RFC 5737, RFC 3849): never anybody's real address.
EXAMPLE_PUBLIC = ipaddress.ip_network("198.18.0.0/15")
EXAMPLE_PUBLIC6 = ipaddress.ip_network("2001:db8:e0::/64")
OUTSIDER_CANDIDATES = [ipaddress.ip_address(a) for a in ("192.0.2.10", "203.0.113.10", "192.0.2.200")]
OUTSIDER6 = "2001:db8:ff::10"


def example_addresses(policy: Policy) -> dict[str, Addresses]:
    """Deterministic addresses that stay put when a role scales, like real droplets' addresses do.

    Host n of the r-th role gets slot (n-1)*roles + r: adding an instance takes a new slot and moves nobody.
    When that layout would overflow the VPC (one role much larger than the rest), hosts are packed in order.
    """
    vpc = policy.stack.vpc_ip_range
    role_pos = {name: r for r, name in enumerate(policy.stack.roles)}
    widest = max((spec.count for spec in policy.stack.roles.values()), default=0)
    interleave = 2 + widest * len(role_pos) < vpc.num_addresses - 1
    out = {}
    for i, host in enumerate(policy.hosts):
        slot = (host.index - 1) * len(role_pos) + role_pos[host.role] if interleave else i
        ipv6 = policy.stack.roles[host.role].ipv6
        public = policy.stack.roles[host.role].public
        out[host.name] = Addresses(
            public=str(EXAMPLE_PUBLIC.network_address + 10 + slot) if public else None,
            private=str(vpc.network_address + 2 + slot),  # .1 is the VPC gateway
            public6=str(EXAMPLE_PUBLIC6.network_address + 0x10 + slot) if ipv6 else None,
        )
    return out


# `pulumi stack output hosts --json` for a full /16 (65 531 hosts) is about 8 MB; nesting is 2 levels.
MAX_ADDRESSES_BYTES = 16 << 20
MAX_JSON_DEPTH = 8


JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings, in linear time (json.loads recurses once per level)."""
    depth = deepest = 0
    for bracket in JSON_BRACKET.finditer(JSON_STRING.sub('""', text)):
        if bracket.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def load_addresses(path: Path, policy: Policy) -> dict[str, Addresses]:
    """`{"mysql-1": {"public": "...", "private": "...", "public6": "..."}}` for every host of the stack."""
    source = str(path)
    text = read_bounded_text(path, "--addresses", MAX_ADDRESSES_BYTES, "JSON file of addresses",
                             "`pulumi stack output hosts --json > addrs.json`")
    if json_depth(text) > MAX_JSON_DEPTH:
        raise StackError([StackIssue("--addresses", f"nested deeper than {MAX_JSON_DEPTH} levels; it is "
                                     "{host: {public, private, public6}}")], source)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StackError([StackIssue("--addresses", f"not valid JSON: {exc}")], source) from None
    issues: list[StackIssue] = []
    out: dict[str, Addresses] = {}
    vpc = policy.stack.vpc_ip_range
    for host in policy.hosts:
        entry = raw.get(host.name) if isinstance(raw, dict) else None
        if not isinstance(entry, dict):
            issues.append(StackIssue(f"--addresses {host.name}", "missing; give public and private addresses"))
            continue
        has_public = policy.stack.roles[host.role].public
        missing = [key for key in ("public", "private") if entry.get(key) is None and (key == "private" or has_public)]
        if missing:
            issues.append(StackIssue(f"--addresses {host.name}", f"{' and '.join(missing)} missing; give both"))
            continue
        if not has_public and entry.get("public") not in (None, ""):
            issues.append(StackIssue(f"--addresses {host.name}", f"public {entry['public']!r} given, but role "
                                     f"{host.role} has `public: false`: its droplets have no public address"))
            continue
        if not has_public:
            entry = {**entry, "public": None}  # the program's `hosts` output says null
        try:
            for key, family in (("public", 4), ("private", 4), ("public6", 6)):
                if entry.get(key) is not None and not isinstance(entry[key], str):
                    raise ValueError(f"{key} must be an address as text, e.g. \"203.0.113.5\", not {entry[key]!r:.60}")
                if entry.get(key) is not None and "%" in entry[key]:
                    # ipaddress takes an IPv6 scope of any text after %, newlines included
                    raise ValueError(f"{key} must be a plain address, without a %scope")
                if entry.get(key) is not None and ipaddress.ip_address(entry[key]).version != family:
                    raise ValueError(f"{key} must be IPv{family}")
            if ipaddress.ip_address(entry["private"]) not in vpc:
                raise ValueError(f"private {entry['private']} is outside vpcIpRange {vpc}")
            if has_public and ipaddress.ip_address(entry["public"]) in vpc:
                raise ValueError(f"public {entry['public']} is inside vpcIpRange {vpc}: the public address is the "
                                 "droplet's Internet one (ip_address), not its VPC one (private_ip_address)")
            out[host.name] = Addresses(entry["public"] if has_public else None, entry["private"], entry.get("public6"))
        except ValueError as exc:
            message = str(exc) if len(str(exc)) <= 300 else str(exc)[:300] + "…"
            issues.append(StackIssue(f"--addresses {host.name}", message))
    for key in ("private", "public", "public6"):
        owners: dict[str, str] = {}
        for name, addrs in out.items():
            address = getattr(addrs, key)
            if address is None:
                continue
            address = str(ipaddress.ip_address(address))  # one spelling: 2001:db8::1 and 2001:DB8:0::1 are one
            if address in owners:
                issues.append(StackIssue(f"--addresses {name}", f"{key} {address} is {owners[address]}'s too; "
                                         "every droplet has its own"))
            owners.setdefault(address, name)
    if issues:
        raise StackError(issues, source)
    return out


# ---------------------------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class Outsiders:
    internet: Endpoint
    operator: Endpoint
    neighbor: Endpoint


def outsiders(stack: StackConfig, addresses: dict[str, Addresses]) -> Outsiders:
    """Concrete stand-ins for `internet`, `operators` and `neighbor` (the lab gives them these addresses)."""
    ops4 = [n for n in stack.operators if n.version == 4]
    ops6 = [n for n in stack.operators if n.version == 6]
    op4 = str(next(ops4[0].hosts()) if ops4[0].num_addresses > 1 else ops4[0].network_address) if ops4 else None
    # The Internet's stand-in is outside `operators` when it can be; operators as wide as 0.0.0.0/0 make the
    # whole Internet operators, and then one of them (any address but the operator's own) stands for it.
    internet = next(
        (a for a in OUTSIDER_CANDIDATES if not any(a in n for n in ops4)),
        next(a for a in OUTSIDER_CANDIDATES if str(a) != op4),
    )
    op6 = str(ops6[0].network_address + (1 if ops6[0].num_addresses > 1 else 0)) if ops6 else None
    used = {a.private for a in addresses.values()}
    vpc = stack.vpc_ip_range
    # the highest free address of the VPC: another tenant's machine on the same private network
    neighbor = next(str(a) for a in (vpc.broadcast_address - k for k in range(1, 64)) if str(a) not in used)
    return Outsiders(
        internet=Endpoint("internet", "internet", str(internet), OUTSIDER6),
        operator=Endpoint("operators", "operator", op4, op6),
        neighbor=Endpoint("neighbor", "neighbor", neighbor),
    )


def endpoints_for(name: str, policy: Policy, others: Outsiders, addresses: dict[str, Addresses]) -> list[Endpoint]:
    if name in ("internet", "outside"):  # outside: every address outside the VPC and operators; the verifier
        return [others.internet]          # proves each of them (enclave.verify.stacktests), this is its sample
    if name == "operators":
        return [others.operator]
    if name == "neighbor":
        return [others.neighbor]
    return [Endpoint("host", h.name, addresses[h.name].public, addresses[h.name].public6) for h in policy.hosts_of(name)]


@dataclass(frozen=True)
class TestResult:
    index: int
    test: PolicyTest
    seen: str  # allow | deny | mixed
    detail: str

    @property
    def passed(self) -> bool:
        return self.seen == self.test.expect

    @staticmethod
    def verdict(allowed: int, denied: int) -> str:
        """A test names pairs: `allow` if every pair got through, `deny` if none did (or none exist), else mixed."""
        return "allow" if allowed and not denied else "mixed" if allowed else "deny"

    def describe(self) -> str:
        t = self.test
        return f"tests[{self.index}]: {t.sources} -> {t.to} {t.port} expect {t.expect}"


def is_outside(name: str) -> bool:
    """A test destination outside the stack: `internet` or a CIDR (a stack host's egress is what is tested)."""
    return name == "internet" or "/" in name


def outside_address(name: str, others: Outsiders) -> str:
    """The address a test to `internet` or to a CIDR is sent to: the lab's Internet, or inside the CIDR the first
    address (the lab's Internet answers on it too)."""
    assert others.internet.address is not None
    if name == "internet" or ipaddress.ip_address(others.internet.address) in ipaddress.ip_network(name):
        return others.internet.address
    net = ipaddress.ip_network(name)
    return str(net.network_address + 1 if net.num_addresses > 1 else net.network_address)


def _egress_test(policy: Policy, test: PolicyTest, index: int, others: Outsiders,
                 addresses: dict[str, Addresses]) -> TestResult:
    """A test from stack hosts to `internet` or a CIDR: each host's egress decides."""
    address = outside_address(test.to, others)
    allowed = denied = 0
    shown: list[str] = []
    (port,) = test.ports  # one port: the schema refuses `any` and ranges in a test to internet or a CIDR
    for src in endpoints_for(test.sources, policy, others, addresses):
        why = egress_verdict(policy, policy.host_by_name[src.name], address, None, port, "public")
        allowed += why is not None
        denied += why is None
        if (why is None) == (test.expect == "allow") and len(shown) < 5:
            shown.append(f"{src.name}->{address}" + (f" ({why})" if why else ""))
    return TestResult(index, test, TestResult.verdict(allowed, denied), "; ".join(shown))


def port_pieces(policy: Policy, role: str, ports: tuple[PortSpec, ...]) -> list[PortSpec]:
    """A test's ports cut where a declaration to `role` starts or ends: decide() then gives one verdict per
    piece that holds for every port in it (a flow admits a piece whole or not at all)."""
    out = []
    for spec in ports:
        if spec.proto == "icmp" or spec.low == spec.high:
            out.append(spec)
            continue
        cuts = {spec.low, spec.high + 1}
        for flow in policy.flows_to_role[role]:
            for p in flow.ports:
                if p.proto == spec.proto:
                    cuts |= {c for c in (p.low, p.high + 1) if spec.low < c <= spec.high}
        edges = sorted(cuts)
        out += [PortSpec(spec.proto, lo, hi - 1) for lo, hi in zip(edges, edges[1:])]
    return out


def evaluate_tests(policy: Policy, addresses: dict[str, Addresses]) -> list[TestResult]:
    """Each test over every pair it names: `allow` needs every pair admitted, `deny` needs none."""
    others = outsiders(policy.stack, addresses)
    results = []
    for i, test in enumerate(policy.stack.tests):
        if is_outside(test.to):
            results.append(_egress_test(policy, test, i, others, addresses))
            continue
        # A role-to-role test names |from| x |to| pairs (382 000 in a 5 000-host fleet), but decide() looks at
        # the destination only through its role: decide once per (source, destination role) and count.
        destinations: dict[str, list[Host]] = {}
        for dst in policy.hosts_of(test.to):
            destinations.setdefault(dst.role, []).append(dst)
        targets = {dst.name for hosts in destinations.values() for dst in hosts}
        allowed = denied = 0
        shown: list[str] = []  # the first pairs that contradict the expectation
        for src in endpoints_for(test.sources, policy, others, addresses):
            for role, hosts in destinations.items():
                for port in port_pieces(policy, role, test.ports):
                    flow = decide(policy, src, hosts[0], port, arrival_interface(src))
                    # a host reaching itself uses loopback, which is always open
                    itself = src.kind == "host" and src.name in targets and policy.host_by_name[src.name].role == role
                    pairs = len(hosts) - itself
                    if flow:
                        allowed += pairs
                    else:
                        denied += pairs
                    if (flow is None) == (test.expect == "allow") and len(shown) < 5:
                        shown += [
                            f"{src.name}->{dst.name}" + (f" {port}" if port != test.port else "")
                            + (f" ({flow.why})" if flow else "")
                            for dst in hosts
                            if not (src.kind == "host" and src.name == dst.name)
                        ][: 5 - len(shown)]
        results.append(TestResult(i, test, TestResult.verdict(allowed, denied), "; ".join(shown)))
    return results


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    stack: Stack
    policy: Policy
    addresses: dict[str, Addresses]
    files: dict[str, RuleFiles]
    tests: list[TestResult]

    @property
    def ok(self) -> bool:
        return all(t.passed for t in self.tests)

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack.name,
            "hosts": [
                {
                    "name": h.name,
                    "role": h.role,
                    "droplet": droplet_name(self.stack.name, h),
                    **{k: v for k, v in vars(self.addresses[h.name]).items()},
                    "rules": self.files[h.name].rule_count,
                }
                for h in self.policy.hosts
            ],
            "flows": [
                {
                    "from": str(f.source),
                    "to": f.role,
                    "ports": [str(p) for p in f.ports],
                    "interface": f.interface,
                    "why": f.why,
                    "description": f.description,
                }
                for f in self.policy.flows
            ],
            "roles": [
                {"role": role, "hosts": int(count), "egress": egress, "description": description or None}
                for role, count, egress, description in role_rows(self.policy)
            ],
            "egress": [
                {"from": role, "to": to, "ports": ports.split(), "interface": via, "why": why}
                for role, to, ports, via, why in egress_rows(self.policy)
            ],
            "tests": [
                {"test": t.describe(), "expect": t.test.expect, "seen": t.seen, "passed": t.passed, "detail": t.detail}
                for t in self.tests
            ],
            "warnings": install_warnings(self.stack.config),
            "ok": self.ok,
        }


def egress_word(policy: Policy, role: str) -> str:
    spec = policy.stack.roles[role]
    if spec.allowlist is None:
        return str(spec.egress)
    n = len(spec.allowlist)
    return f"allowlist ({n} {'entry' if n == 1 else 'entries'})" if n else "allowlist (empty: essentials only)"


def role_rows(policy: Policy) -> list[tuple[str, str, str, str]]:
    """(role, hosts, egress, description) for the plan's roles table."""
    return [(name, str(spec.count), egress_word(policy, name), spec.description or "")
            for name, spec in policy.stack.roles.items()]


def egress_rows(policy: Policy) -> list[tuple[str, str, str, str, str]]:
    """(from role, to, ports, via, why) per allowlist entry and essential, for the plan's egress table."""
    return [
        (role, e.to, " ".join(str(p) for p in e.ports), e.interface or "any",
         e.why + (f" ({e.description})" if e.description else ""))
        for role, allowed in policy.egress.items()
        for e in allowed
    ]


def droplet_name(stack_name: str, host: Host) -> str:
    return f"{stack_name}-{host.name}"


def build_plan(stack: Stack, addresses: dict[str, Addresses] | None = None) -> Plan:
    policy = compile_policy(stack.config)
    addrs = addresses if addresses is not None else example_addresses(policy)
    files = Renderer(policy, addrs, stack.name).render_all()
    return Plan(stack, policy, addrs, files, evaluate_tests(policy, addrs))
