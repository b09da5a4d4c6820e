"""The checks that need the whole stack, after pydantic has accepted every key on its own: a `from` or `to` naming
an unknown role or host, a VPC range too small for the hosts, operators missing while a bastion exists, what a
private role cannot have, tests that could never run, egress allowlist entries the destination's ingress would
drop. Each problem is a StackIssue named by the key a user edits; config/schema.py's `load_config` runs these.

For users: docs/stack-file.md (what is refused).
"""

from __future__ import annotations

import ipaddress
import re

from .issues import NAMESPACE, StackIssue
from .models import StackConfig, never_a_source
from .names import set_name_collisions
from .ports import PortSpec
from .suggest import did_you_mean


def check_references(stack: StackConfig, prefix: str = NAMESPACE + ":") -> list[StackIssue]:
    """Every problem of `stack` that no single key shows, each named by its key path after `prefix`."""
    issues: list[StackIssue] = []

    def bad(path: str, message: str) -> None:
        issues.append(StackIssue(prefix + path, message))

    for role_name, role in stack.roles.items():
        for i, rule in enumerate(role.ingress):
            path = f"roles.{role_name}.ingress[{i}].from"
            for source in rule.sources:
                problem = _source_problem(stack, source)
                if problem:
                    bad(path, problem)
                elif ":" in source and not role.ipv6:
                    # an IPv6 range can only reach a droplet that has a public IPv6 address
                    bad(
                        path,
                        f"{source!r} is an IPv6 range but role {role_name} has no IPv6 (ipv6: false), so it "
                        "would admit nothing; set ipv6: true on the role or give an IPv4 range",
                    )
        for i, entry in enumerate(role.allowlist or []):
            for destination in entry.to:
                problem = _destination_problem(stack, role_name, destination, entry.ports)
                if problem:
                    bad(f"roles.{role_name}.egress[{i}].to", problem)
        for i, tag in enumerate(role.tags):
            if tag.startswith("enclave"):
                bad(f"roles.{role_name}.tags[{i}]", f"tag {tag!r}: tags starting with 'enclave' are enclave's own")

    issues += [StackIssue(prefix + path, message) for path, message in _private_role_issues(stack)]

    if stack.bastion_roles():
        if not stack.operators:
            bad(
                "operators",
                f"bastion role(s) {', '.join(stack.bastion_roles())} accept SSH only from `operators`, which "
                "is empty: add your address, e.g. `pulumi config set --path 'operators[0]' 198.51.100.7/32`",
            )
        elif sum(stack.roles[r].count for r in stack.bastion_roles()) == 0:
            bad(
                f"roles.{stack.bastion_roles()[0]}.count",
                "every bastion role has count 0, so no host could be reached over SSH; set count: 1",
            )
    elif not stack.operators:
        bad("operators", "no bastion role and no `operators`: nobody could SSH to any host; add your address")
    for net in stack.operators:
        if net.version == 4 and net.overlaps(stack.vpc_ip_range):
            bad(
                "operators",
                f"{net} overlaps vpcIpRange {stack.vpc_ip_range}, but operators are matched on the public "
                "interface, where VPC addresses never arrive; give the public address you run `pulumi up` from",
            )
    if stack.operators and not any(net.version == 4 for net in stack.operators):
        # the pushes (and `enclave ssh-config`) dial the bastion's, or each host's, public IPv4 address
        bad(
            "operators",
            "has no IPv4 range, but `pulumi up` pushes over SSH to public IPv4 addresses; add the IPv4 "
            "address you run `pulumi up` from (e.g. 198.51.100.7/32)",
        )

    for host in stack.repush:
        role_name, _, number = host.rpartition("-")
        if role_name not in stack.roles or not number.isdigit() or not 1 <= int(number) <= stack.roles[role_name].count:
            bad(f"repush.{host}", f"no host {host!r} in this stack (hosts are <role>-<n>); remove the entry: "
                f"`pulumi config rm --path 'repush[\"{host}\"]'`")

    hosts = sum(role.count for role in stack.roles.values())
    # DigitalOcean reserves the network and broadcast addresses and a gateway; keep 3 spare.
    usable = stack.vpc_ip_range.num_addresses - 5
    if hosts > usable:
        length = 32 - (hosts + 5 - 1).bit_length()
        fix = (
            f"use a larger range, e.g. /{length}"
            if length >= 16
            else f"a VPC is at most a /16 ({2**16 - 5} droplets): lower the counts or split the fleet into stacks"
        )
        bad("vpcIpRange", f"{stack.vpc_ip_range} holds {usable} droplets but the roles ask for {hosts}; {fix}")

    if stack.interfaces.public == stack.interfaces.private:
        bad("interfaces", "public and private must be different interfaces")

    for set_name, first, second in set_name_collisions(list(stack.roles)):
        bad(second, f"its ipset would be named {set_name}, as {first}'s is; rename one of them")

    for i, test in enumerate(stack.tests):
        for key, name in (("from", test.sources), ("to", test.to)):
            problem = _endpoint_problem(stack, name, source=key == "from")
            if problem:
                bad(f"tests[{i}].{key}", problem)
        outside = test.to == "internet" or "/" in test.to
        if outside and test.sources in ("internet", "operators", "neighbor", "outside"):
            bad(f"tests[{i}].from", f"a test to {test.to} checks a stack host's egress: start it from a role or a host")
        if outside and (test.port == "any" or test.port.low != test.port.high):
            bad(f"tests[{i}].port", f"a test to {test.to} checks one port (e.g. tcp/443); `any` and ranges are for "
                                    "tests to a role or a host, which the verifier proves for every port")
        ends = _hosts_named(stack, test.sources)
        if len(ends) == 1 and ends == _hosts_named(stack, test.to):
            bad(
                f"tests[{i}]",
                f"from and to are the same single host ({ends.pop()}): a host reaches itself over loopback, "
                "which enclave always leaves open; name another source",
            )
    return issues

def _private_role_issues(stack: StackConfig) -> list[tuple[str, str]]:
    """What a role without public networking cannot have: nothing public reaches it, nothing public is on it."""
    out: list[tuple[str, str]] = []
    for role_name in stack.private_roles():
        role = stack.roles[role_name]
        key = f"roles.{role_name}"
        if role.bastion:
            out.append((f"{key}.public", "a bastion is what operators SSH to from the Internet, so it needs public "
                        "networking; remove `public: false` or `bastion: true`"))
        if role.ipv6:
            out.append((f"{key}.ipv6", "a droplet without public networking has no IPv6 address (the VPC is "
                        "IPv4 only); remove `ipv6: true` or `public: false`"))
        for i, rule in enumerate(role.ingress):
            for source in rule.sources:
                if source in ("internet", "operators") or (source not in stack.roles and not stack.role_of_host(source)
                                                           and _source_problem(stack, source) is None):
                    out.append((f"{key}.ingress[{i}].from", f"{source!r} arrives on a public interface, which a "
                                f"role with `public: false` does not have, so nothing public can reach it; admit "
                                "a role or host of the stack, or remove `public: false`"))
    if stack.private_roles() and not stack.bastion_roles():
        out.append((f"roles.{stack.private_roles()[0]}.public", "droplets without public networking are reached "
                    "only through a bastion, and the stack has none; add a role with `bastion: true`"))
    return out

def _hosts_named(stack: StackConfig, name: str) -> set[str]:
    if name in stack.roles:
        return {f"{name}-{n}" for n in range(1, stack.roles[name].count + 1)}
    return {name} if stack.role_of_host(name) else set()

def _names(stack: StackConfig) -> list[str]:
    """Every role and host name, for did-you-mean."""
    return [*stack.roles, *(f"{r}-{n}" for r, spec in stack.roles.items() for n in range(1, min(spec.count, 50) + 1))]

def admits(stack: StackConfig, destination_role: str, source_role: str, port: PortSpec) -> bool:
    """Whether `destination_role`'s ingress (or the built-in SSH through a bastion) admits every host of
    `source_role` on `port`: what an egress allowlist entry naming the role must agree with."""
    if port.proto == "tcp" and port.low == port.high == 22 and stack.roles[source_role].bastion:
        return True
    return any(
        (source_role in rule.sources or "all" in rule.sources) and any(p.contains(port) for p in rule.ports)
        for rule in stack.roles[destination_role].ingress
    )

def _destination_problem(stack: StackConfig, role_name: str, destination: str, ports: list[PortSpec]) -> str | None:
    """Why an egress `to` entry of `role_name` names nothing enclave can allow, or None."""
    if destination == "internet":
        return None
    if destination in stack.roles or destination == "all" or stack.role_of_host(destination):
        if destination == "all":
            targets = [r for r, spec in stack.roles.items() if spec.count]
        else:
            targets = [destination if destination in stack.roles else str(stack.role_of_host(destination))]
        refused = [f"{target} on {port}" for target in targets for port in ports
                   if not admits(stack, target, role_name, port)]
        if refused:
            first_role, _, first_port = refused[0].partition(" on ")
            return (
                f"{destination!r}: the ingress of {', '.join(refused[:5])}{' …' if len(refused) > 5 else ''} "
                f"does not admit role {role_name}, so the connection would be dropped there; add "
                f"{{from: {role_name}, ports: [{first_port}]}} to roles.{first_role}.ingress, or remove this entry"
            )
        return None
    if destination in ("operators", "neighbor", "any"):
        return (f"{destination!r} is not a destination; egress goes to roles, hosts (<role>-<n>), all, "
                "internet or CIDRs")
    if "," in destination:
        return _one_string_list(destination, "destinations", "to")
    if "/" in destination or ":" in destination or re.fullmatch(r"[\d.]+", destination):
        try:
            net = ipaddress.ip_network(destination, strict=True)
        except ValueError as exc:
            return f"{destination!r} is not a valid CIDR ({exc})"
        if net.prefixlen == 0:
            return f"{destination!r} is every address; write `internet`"
        if net.is_loopback or net.is_multicast:
            return f"{destination!r} is {'loopback (always open)' if net.is_loopback else 'multicast'}; it is not a destination"
        if net.version == 4 and net.overlaps(stack.vpc_ip_range) and not net.subnet_of(stack.vpc_ip_range):
            return (f"{destination!r} covers vpcIpRange {stack.vpc_ip_range} and beyond: the VPC is reached on "
                    "the private interface, the rest on the public one; write the two ranges apart")
        if net.version == 6 and not stack.roles[role_name].ipv6:
            return (f"{destination!r} is an IPv6 range but role {role_name} has no IPv6 (ipv6: false); set "
                    "ipv6: true on the role or give an IPv4 range")
        return None
    return _host_problem(stack, destination) or (
        f"{destination!r} is not a role, a host (<role>-<n>), all, internet or a CIDR"
        f"{did_you_mean(destination, [*_names(stack), 'all', 'internet'])}; known roles: {', '.join(stack.roles)}"
    )

def _one_string_list(value: str, what: str, key: str) -> str:
    """A list written as one string (`from: wordpress, mysql`): the list to write instead."""
    listed = ", ".join(part.strip() for part in value.split(","))
    return f"{value!r}: several {what} are a list, e.g. {key}: [{listed}]"


def _host_problem(stack: StackConfig, name: str) -> str | None:
    """Why `name`, shaped like a host of an existing role (`mysql-3`, `mysql-01`), is not one of its hosts."""
    role, dash, number = name.rpartition("-")
    if not dash or role not in stack.roles or not re.fullmatch(r"[0-9]+", number) or stack.role_of_host(name):
        return None
    count = stack.roles[role].count
    if count == 0:
        return f"{name!r}: role {role} has count 0, so it has no hosts"
    hosts = f"{role}-1" if count == 1 else f"{role}-1 … {role}-{count}"
    if 1 <= int(number) <= count:
        return f"{name!r}: host numbers have no leading zeros; write {role}-{int(number)}"
    return f"{name!r}: role {role} has only {count} host(s), {hosts}"

def _source_problem(stack: StackConfig, source: str) -> str | None:
    """Why an ingress `from` entry names nothing enclave can match, or None."""
    if source in ("internet", "operators", "all") or source in stack.roles or stack.role_of_host(source):
        return None
    if "," in source:
        return _one_string_list(source, "sources", "from")
    if "/" in source or ":" in source or re.fullmatch(r"[\d.]+", source):
        try:
            net = ipaddress.ip_network(source, strict=True)
        except ValueError as exc:
            return f"{source!r} is not a valid CIDR ({exc})"
        unusable = never_a_source(net)
        if unusable:
            return f"{source!r} can never match: it is {unusable}"
        # CIDR sources are matched on the public interface: VPC addresses never arrive there.
        if net.version == 4 and stack.vpc_ip_range.subnet_of(net):
            return (
                f"{source!r} also covers vpcIpRange {stack.vpc_ip_range}, but a CIDR is matched on the public "
                "interface only; write `internet` for anyone on the Internet, or a range outside the VPC"
            )
        if net.version == 4 and net.overlaps(stack.vpc_ip_range):
            return f"{source!r} lies inside vpcIpRange {stack.vpc_ip_range}; name the role or host instead"
        return None
    if source == "outside":
        return ("'outside' is only for tests (every address outside vpcIpRange and operators); ingress admits "
                "roles, hosts, internet, operators or CIDRs")
    if source == "neighbor":
        return (
            "'neighbor' is only for tests (another tenant on the private network, which nothing admits); "
            "ingress admits roles, hosts, internet, operators or CIDRs"
        )
    return _host_problem(stack, source) or (
        f"{source!r} is not a role, a host (<role>-<n>), all, internet, operators or a CIDR"
        f"{did_you_mean(source, [*_names(stack), 'all', 'internet', 'operators'])}; "
        f"known roles: {', '.join(stack.roles)}"
    )

def _endpoint_problem(stack: StackConfig, name: str, source: bool) -> str | None:
    """Why a test's `from` (source=True) or `to` names nothing the test could probe, or None."""
    if name == "internet" and not source:
        return None  # the lab's `internet` answers on every probed port
    if name in ("internet", "operators", "neighbor", "outside"):
        return None if source else f"{name!r} cannot be a destination; name a role, a host, internet or a CIDR"
    if name in stack.roles:
        if stack.roles[name].count == 0:
            return f"role {name!r} has count 0, so the test could never run; remove the test or raise the count"
        return None
    if stack.role_of_host(name):
        return None
    if source and ("/" in name or ":" in name or re.fullmatch(r"[\d.]+", name)):
        return (
            f"{name!r}: a test starts from a role, a host, internet, operators, outside or neighbor, not an "
            "address range (outside is every address outside vpcIpRange and operators)"
        )
    if not source and ("/" in name or ":" in name or re.fullmatch(r"[\d.]+", name)):
        try:
            net = ipaddress.ip_network(name, strict=True)
        except ValueError as exc:
            return f"{name!r} is not a valid CIDR ({exc})"
        if net.version != 4 or net.overlaps(stack.vpc_ip_range) or never_a_source(net) or net.prefixlen == 0:
            return (f"{name!r}: a test's CIDR destination is an IPv4 range on the Internet (outside vpcIpRange "
                    f"{stack.vpc_ip_range}, not link-local, loopback or multicast; for everything write internet)")
        return None
    kinds = ("a role, a host (<role>-<n>), outside, internet, operators or neighbor" if source
             else "a role, a host (<role>-<n>), internet or a CIDR")
    words = ["outside", "internet", "operators", "neighbor"] if source else ["internet"]
    return _host_problem(stack, name) or (
        f"{name!r} is not {kinds}{did_you_mean(name, [*_names(stack), *words])}; known roles: {', '.join(stack.roles)}"
    )
