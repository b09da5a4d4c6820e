"""The stack file's schema: what a user may write under `config:` with the `enclave:` prefix.

Two layers of checks, both before anything is created:
  1. pydantic validates shapes and values key by key (unknown keys, bad ports, bad CIDRs, negative counts…);
  2. `StackConfig.check_references` validates what needs the whole stack (a `from` naming an unknown role,
     a VPC range too small for the hosts, operators missing while a bastion exists…).
A third layer needs the compiled policy and so lives beside the compiler: the limits on rules per host and set
members (enclave/limits.py), checked by `enclave` and the program right after this module accepts a stack.
Every problem becomes a `StackIssue` whose `path` is the key a user edits, e.g. `enclave:roles.mysql.count`.

No Pulumi import here: the CLI, the lab and the Pulumi program all load stacks through this module.

For users: docs/stack-file.md (every key, what is refused, the limits).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic.alias_generators import to_camel

from .names import set_name_collisions

NAMESPACE = "enclave"

# RFC 1123 label; DigitalOcean droplet names and Linux hostnames accept these.
HOSTNAME_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
INTERFACE_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,15}$")  # IFNAMSIZ - 1
HOST_NUMBER = re.compile(r"[1-9][0-9]*")  # ASCII only: str.isdigit() also takes '١' and '²'
# Words with a fixed meaning in `from` / `to`; a role may not take these names.
RESERVED_NAMES = frozenset({"internet", "operators", "neighbor", "outside", "all", "any"})

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
RFC1918 = tuple(ipaddress.IPv4Network(block) for block in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))

# Source ranges no packet arriving on a droplet's public interface can come from, and why (ingress `from`
# CIDRs and `operators` are matched there). Link-local is refused too: such a packet never crosses a router,
# so it could only come from the droplet's own public segment, whose only other members are the provider's
# (and a neighbour spoofing them); admitting it admits nobody you could name.
NEVER_A_SOURCE: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("::ffff:0:0/96"), "IPv4-mapped IPv6: IPv4 packets are matched by iptables as IPv4, "
     "never as ::ffff:a.b.c.d; write the IPv4 range itself"),
    (ipaddress.ip_network("127.0.0.0/8"), "loopback: it never arrives on a network interface"),
    (ipaddress.ip_network("::1/128"), "loopback: it never arrives on a network interface"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast: a multicast address is never a packet's source"),
    (ipaddress.ip_network("ff00::/8"), "multicast: a multicast address is never a packet's source"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local: it never crosses a router, so only the droplet's own "
     "segment (the provider's gateway) could send from it"),
    (ipaddress.ip_network("fe80::/10"), "link-local: it never crosses a router, so only the droplet's own "
     "segment (the provider's gateway) could send from it"),
    (ipaddress.ip_network("0.0.0.0/8"), "'this network': not a source address on the Internet"),
    (ipaddress.ip_network("::/128"), "the unspecified address: not a source address"),
)


def never_a_source(net: IPNetwork) -> str | None:
    """Why no packet from `net` can reach a public interface, or None when some can."""
    for block, why in NEVER_A_SOURCE:
        if net.version == block.version and net.subnet_of(block):  # type: ignore[arg-type]
            return why
    return None


# Limits on what a stack may expand to, so a stack file (or its aliases) cannot make a host's rule set, the
# plan or the push unbounded. Each is far above any real stack (prod: 4 roles, 1-2 entries, 2 ports, 7 rules
# per host) and below where cost becomes a problem: see docs/stack-file.md "Limits". The last two are counted
# on the compiled policy, as rendered (enclave/limits.py), once the stack is otherwise valid.
MAX_ROLES = 100  # each role is a set every host that admits it references, and a tag per droplet
MAX_INGRESS_PER_ROLE = 100
MAX_PORTS_PER_ENTRY = 100
# A baseline rule each on bastions (the booting droplet has no set yet), and the baseline travels in the user
# data, which DigitalOcean caps at 64 KiB: 200 IPv6 operators on a bastion with a non-root user fill ~61 KiB
# (tests/test_schema.py checks the worst case).
MAX_OPERATORS = 200
MAX_TESTS = 1_000
# iptables walks a chain rule by rule for every new connection; enclave's rules grow with declarations only
# (peers are sets), so a host over 2 000 rules is a stack written one entry per port or address, not a big
# fleet. Sources per entry have no limit of their own: this one bounds what they expand to.
MAX_RULES_PER_HOST = 2_000
# Every host's ipset file lists the private address of every host of every role it admits or sends to, so what
# a fleet pushes in all grows with hosts x peers, and `enclave plan` holds it in memory at once; past this, a stack
# would exhaust memory long before `pulumi up` could push it (docs/stack-file.md "Limits" gives the sizes).
MAX_SET_MEMBERS = 25_000_000


@dataclass(frozen=True)
class StackIssue:
    """One problem in a stack file, named by the key path the user has to edit."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class StackError(Exception):
    """A stack file that must not be deployed. Carries every issue found, not just the first."""

    def __init__(self, issues: list[StackIssue], source: str = "stack") -> None:
        self.issues = issues
        self.source = source
        lines = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(f"{source}: {len(issues)} problem(s); nothing was created or changed:\n{lines}")


# ---------------------------------------------------------------------------------------------- ports


@dataclass(frozen=True, order=True)
class PortSpec:
    """`tcp/80`, `udp/53`, `tcp/24007-24008` or `icmp` (echo request, i.e. ping)."""

    proto: Literal["tcp", "udp", "icmp"]
    low: int = 0
    high: int = 0

    def __str__(self) -> str:
        if self.proto == "icmp":
            return "icmp"
        if self.low == self.high:
            return f"{self.proto}/{self.low}"
        return f"{self.proto}/{self.low}-{self.high}"

    def contains(self, other: PortSpec) -> bool:
        return self.proto == other.proto and self.low <= other.low and other.high <= self.high

    @classmethod
    def parse(cls, value: object) -> PortSpec:
        if isinstance(value, PortSpec):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{value!r} is not a port; write tcp/80, udp/53, tcp/8000-8100 or icmp")
        text = str(value).strip().lower()
        if text == "icmp":
            return cls("icmp")
        if "," in text:
            listed = ", ".join(part.strip() for part in text.split(","))
            raise ValueError(f"{value!r}: several ports are a list, e.g. ports: [{listed}]")
        proto, sep, rest = text.partition("/")
        if not sep:  # a bare number means tcp
            proto, rest = "tcp", text
        if proto not in ("tcp", "udp"):
            raise ValueError(f"{value!r}: protocol must be tcp, udp or icmp (e.g. tcp/80)")
        low_text, dash, high_text = rest.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if dash else low
        except ValueError:
            raise ValueError(f"{value!r} is not a port; write tcp/80, udp/53, tcp/8000-8100 or icmp") from None
        for port in (low, high):
            if not 1 <= port <= 65535:
                raise ValueError(f"{value!r}: port {port} is outside 1-65535")
        if low > high:
            raise ValueError(f"{value!r}: range start {low} is above its end {high}; write {proto}/{high}-{low}")
        return cls(proto, low, high)  # type: ignore[arg-type]


def _to_list(value: object) -> object:
    return [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value


def _parse_ports(value: object) -> object:
    value = _to_list(value)
    if not isinstance(value, list):
        return value
    return [PortSpec.parse(item) for item in value]


def _parse_port(value: object) -> PortSpec:
    return PortSpec.parse(value)


Ports = Annotated[list[PortSpec], BeforeValidator(_parse_ports), Field(min_length=1, max_length=MAX_PORTS_PER_ENTRY)]
Port = Annotated[PortSpec, BeforeValidator(_parse_port)]
SourceList = Annotated[list[str], BeforeValidator(_to_list), Field(min_length=1)]


# --------------------------------------------------------------------------------------------- models


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        arbitrary_types_allowed=True,
    )


class Ingress(_Strict):
    """Who may open connections to a role, and on which ports."""

    sources: SourceList = Field(alias="from")
    ports: Ports


# A role's private addresses are one ipset on each host that admits the role, and an ipset holds at most
# 65 536 members by default; the VPC range (a /16 at most) bounds the whole fleet below that anyway. No lower
# cap: a role that had to be split to grow would cost every host admitting it one more set per new connection
# (docs/benchmarks.md: 10 000 peers in one role keep the floor's new-connection rate, 102%; as 10 roles of 1 000, 89%).
MAX_COUNT = 65_536


def _not_a_bool(value: object) -> object:
    # pydantic reads true as 1: `count: true` was one host
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is true/false, not a number; write the number of droplets, e.g. 1")
    return value


class Role(_Strict):
    count: Annotated[int, BeforeValidator(_not_a_bool)] = Field(ge=0, le=MAX_COUNT)
    size: str = Field(min_length=1)
    image: str | None = None
    ipv6: bool = False
    tags: list[str] = Field(default_factory=list)
    bastion: bool = False
    egress: Literal["open", "restricted"] = "open"
    ingress: list[Ingress] = Field(default_factory=list, max_length=MAX_INGRESS_PER_ROLE)

    @field_validator("tags")
    @classmethod
    def _tags_are_do_tags(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not re.fullmatch(r"[A-Za-z0-9_:-]{1,255}", tag):
                raise ValueError(f"tag {tag!r} may hold only letters, digits, '_', ':' and '-'")
        return tags


class Interfaces(_Strict):
    public: str = "eth0"
    private: str = "eth1"

    @field_validator("public", "private")
    @classmethod
    def _is_interface_name(cls, name: str) -> str:
        if not INTERFACE_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"{name!r} is not a Linux interface name (1-15 of letters, digits, _ . -)")
        if name in ("all", "default"):
            # the kernel refuses them (RTNETLINK: Invalid argument): net.ipv4.conf.all/default are not devices
            raise ValueError(f"{name!r} is reserved by the kernel for settings of every interface; name the device")
        if name.startswith("-"):
            raise ValueError(f"{name!r} starts with '-', which iptables (-i {name}) would read as an option")
        if name == "lo":
            raise ValueError(
                "'lo' is the loopback interface, which enclave always accepts on; name the droplet's network "
                "interface (DigitalOcean: public eth0, private eth1)"
            )
        return name


def _parse_test_port(value: object) -> object:
    return value if value == "any" else PortSpec.parse(value)


# Every tcp and udp port, the ports a `port: any` test covers.
ANY_PORTS = (PortSpec("tcp", 1, 65535), PortSpec("udp", 1, 65535))


class PolicyTest(_Strict):
    """An expectation checked against the compiled policy (plan), proved for every packet by the verifier
    (plan), and probed with real packets (lab). `port` is one port, a range, or `any` (every tcp and udp port);
    `from: outside` is every address outside vpcIpRange and operators."""

    sources: str = Field(alias="from")
    to: str
    port: Annotated[PortSpec | Literal["any"], BeforeValidator(_parse_test_port)]
    expect: Literal["allow", "deny"]

    @property
    def ports(self) -> tuple[PortSpec, ...]:
        return ANY_PORTS if self.port == "any" else (self.port,)


class StackConfig(_Strict):
    region: str = Field(min_length=1)
    vpc_ip_range: ipaddress.IPv4Network
    image: str = Field(min_length=1)
    ssh_user: str = "root"
    ssh_public_key: str
    operators: list[IPNetwork] = Field(default_factory=list, max_length=MAX_OPERATORS)
    interfaces: Interfaces = Field(default_factory=Interfaces)
    roles: dict[str, Role] = Field(min_length=1, max_length=MAX_ROLES)
    tests: list[PolicyTest] = Field(default_factory=list, max_length=MAX_TESTS)
    log_drops: bool = False
    cloud_firewall: bool = False
    # How long one host's push (`pulumi up`'s local command) may keep dialing and retrying, booting droplet
    # included, before it fails naming the host. A fresh droplet needs a minute or two before sshd answers.
    push_timeout: int = Field(default=600, ge=60, le=86_400)
    # apt's HTTP(S) proxy on every droplet (cloud-init's apt module), for droplets that reach no package mirror
    # themselves: the first boot and every push install ipset (and iptables on Debian) through it.
    apt_proxy: str | None = None

    @field_validator("apt_proxy")
    @classmethod
    def _apt_proxy_is_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:_-]+/?", value):
            raise ValueError(f"{value!r} is not an apt proxy URL: write http://HOST:PORT, e.g. http://10.110.16.2:3142")
        return value

    @field_validator("vpc_ip_range", mode="before")
    @classmethod
    def _vpc_is_network(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                net = ipaddress.ip_network(value, strict=True)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a network address ({exc}); e.g. 10.110.16.0/24") from None
            # RFC 1918 exactly: `is_private` also admits 198.18.0.0/15 and the documentation ranges, which
            # DigitalOcean refuses for a VPC (and the plan and lab use as example public addresses)
            if net.version != 4 or not any(net.subnet_of(block) for block in RFC1918):
                raise ValueError(
                    f"{value!r} must be a private IPv4 range (RFC 1918: inside 10.0.0.0/8, 172.16.0.0/12 or "
                    "192.168.0.0/16), e.g. 10.110.16.0/24"
                )
            if net.prefixlen > 28 or net.prefixlen < 16:
                raise ValueError(f"{value!r}: DigitalOcean VPC ranges are /16 to /28")
        elif value is not None:
            # pydantic would read a bare number as an address (167772160 -> 10.0.0.0/32)
            raise ValueError(f"{value!r} is not a network address; write it as a range, e.g. 10.110.16.0/24")
        return value

    @field_validator("operators", mode="before")
    @classmethod
    def _operators_are_networks(cls, value: object) -> object:
        value = _to_list(value)
        if isinstance(value, list):
            out = []
            for item in value:
                try:
                    net = ipaddress.ip_network(str(item), strict=True)
                except ValueError as exc:
                    raise ValueError(f"{item!r} is not an address range ({exc}); e.g. 198.51.100.7/32") from None
                unusable = never_a_source(net)
                if unusable:
                    # the pushes dial from an operator address to a bastion's public address
                    raise ValueError(f"{item!r} is {unusable}; give the public address you run `pulumi up` from")
                if net.prefixlen == 0:
                    # operators are an ipset (hash:net), which holds /1 to /32 (/128): a push with /0 is rejected
                    raise ValueError(
                        f"{item!r}: operators are the addresses you SSH from (an ipset, which cannot hold a /0); "
                        "to let anyone try SSH, add {from: internet, ports: [tcp/22]} to the bastion's ingress"
                    )
                out.append(net)
            return out
        return value

    @field_validator("ssh_user")
    @classmethod
    def _is_user_name(cls, user: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
            raise ValueError(
                f"{user!r} is not a Linux user name: up to 32 lower-case letters, digits, '_' and '-', "
                "starting with a letter or '_' (e.g. root, or a sudo user like deploy)"
            )
        return user

    @field_validator("ssh_public_key")
    @classmethod
    def _is_openssh_public_key(cls, key: str) -> str:
        if not re.fullmatch(r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+( .*)?", key.strip()):
            raise ValueError("expected one OpenSSH public key line, e.g. 'ssh-ed25519 AAAA... ops@example'")
        return key.strip()

    @field_validator("roles")
    @classmethod
    def _role_names(cls, roles: dict[str, Role]) -> dict[str, Role]:
        for name in roles:
            if not HOSTNAME_LABEL.fullmatch(name) or len(name) > 40:
                raise ValueError(
                    f"role name {name!r} must be a hostname: lower-case letters, digits and '-', "
                    "not starting or ending with '-', at most 40 characters"
                )
            if name in RESERVED_NAMES:
                raise ValueError(f"role name {name!r} is reserved (it means something in `from`); rename the role")
            if re.search(r"-\d+$", name):
                raise ValueError(
                    f"role name {name!r} ends in -<number>, which would clash with host names like {name}-1; "
                    "rename the role"
                )
        return roles

    # ---------------------------------------------------------------------------- whole-stack checks

    def role_of_host(self, name: str) -> str | None:
        """`mysql-2` -> `mysql` when that role has at least 2 instances."""
        role, dash, number = name.rpartition("-")
        if dash and role in self.roles and HOST_NUMBER.fullmatch(number):
            if 1 <= int(number) <= self.roles[role].count:
                return role
        return None

    def bastion_roles(self) -> list[str]:
        return [name for name, role in self.roles.items() if role.bastion]

    def check_references(self, prefix: str = NAMESPACE + ":") -> list[StackIssue]:
        issues: list[StackIssue] = []

        def bad(path: str, message: str) -> None:
            issues.append(StackIssue(prefix + path, message))

        for role_name, role in self.roles.items():
            for i, rule in enumerate(role.ingress):
                path = f"roles.{role_name}.ingress[{i}].from"
                for source in rule.sources:
                    problem = self._source_problem(source)
                    if problem:
                        bad(path, problem)
                    elif ":" in source and not role.ipv6:
                        # an IPv6 range can only reach a droplet that has a public IPv6 address
                        bad(
                            path,
                            f"{source!r} is an IPv6 range but role {role_name} has no IPv6 (ipv6: false), so it "
                            "would admit nothing; set ipv6: true on the role or give an IPv4 range",
                        )
            for i, tag in enumerate(role.tags):
                if tag.startswith("enclave"):
                    bad(f"roles.{role_name}.tags[{i}]", f"tag {tag!r}: tags starting with 'enclave' are enclave's own")

        if self.bastion_roles():
            if not self.operators:
                bad(
                    "operators",
                    f"bastion role(s) {', '.join(self.bastion_roles())} accept SSH only from `operators`, which "
                    "is empty: add your address, e.g. `pulumi config set --path 'operators[0]' 198.51.100.7/32`",
                )
            elif sum(self.roles[r].count for r in self.bastion_roles()) == 0:
                bad(
                    f"roles.{self.bastion_roles()[0]}.count",
                    "every bastion role has count 0, so no host could be reached over SSH; set count: 1",
                )
        elif not self.operators:
            bad("operators", "no bastion role and no `operators`: nobody could SSH to any host; add your address")
        for net in self.operators:
            if net.version == 4 and net.overlaps(self.vpc_ip_range):
                bad(
                    "operators",
                    f"{net} overlaps vpcIpRange {self.vpc_ip_range}, but operators are matched on the public "
                    "interface, where VPC addresses never arrive; give the public address you run `pulumi up` from",
                )
        if self.operators and not any(net.version == 4 for net in self.operators):
            # the pushes (and `enclave ssh-config`) dial the bastion's, or each host's, public IPv4 address
            bad(
                "operators",
                "has no IPv4 range, but `pulumi up` pushes over SSH to public IPv4 addresses; add the IPv4 "
                "address you run `pulumi up` from (e.g. 198.51.100.7/32)",
            )

        hosts = sum(role.count for role in self.roles.values())
        # DigitalOcean reserves the network and broadcast addresses and a gateway; keep 3 spare.
        usable = self.vpc_ip_range.num_addresses - 5
        if hosts > usable:
            length = 32 - (hosts + 5 - 1).bit_length()
            fix = (
                f"use a larger range, e.g. /{length}"
                if length >= 16
                else f"a VPC is at most a /16 ({2**16 - 5} droplets): lower the counts or split the fleet into stacks"
            )
            bad("vpcIpRange", f"{self.vpc_ip_range} holds {usable} droplets but the roles ask for {hosts}; {fix}")

        if self.interfaces.public == self.interfaces.private:
            bad("interfaces", "public and private must be different interfaces")

        for set_name, first, second in set_name_collisions(list(self.roles)):
            bad(second, f"its ipset would be named {set_name}, as {first}'s is; rename one of them")

        for i, test in enumerate(self.tests):
            for key, name in (("from", test.sources), ("to", test.to)):
                problem = self._endpoint_problem(name, source=key == "from")
                if problem:
                    bad(f"tests[{i}].{key}", problem)
            ends = self._hosts_named(test.sources)
            if len(ends) == 1 and ends == self._hosts_named(test.to):
                bad(
                    f"tests[{i}]",
                    f"from and to are the same single host ({ends.pop()}): a host reaches itself over loopback, "
                    "which enclave always leaves open; name another source",
                )
        return issues

    def _hosts_named(self, name: str) -> set[str]:
        if name in self.roles:
            return {f"{name}-{n}" for n in range(1, self.roles[name].count + 1)}
        return {name} if self.role_of_host(name) else set()

    def _host_problem(self, name: str) -> str | None:
        """Why `name`, shaped like a host of an existing role (`mysql-3`, `mysql-01`), is not one of its hosts."""
        role, dash, number = name.rpartition("-")
        if not dash or role not in self.roles or not re.fullmatch(r"[0-9]+", number) or self.role_of_host(name):
            return None
        count = self.roles[role].count
        if count == 0:
            return f"{name!r}: role {role} has count 0, so it has no hosts"
        hosts = f"{role}-1" if count == 1 else f"{role}-1 … {role}-{count}"
        if 1 <= int(number) <= count:
            return f"{name!r}: host numbers have no leading zeros; write {role}-{int(number)}"
        return f"{name!r}: role {role} has only {count} host(s), {hosts}"

    def _source_problem(self, source: str) -> str | None:
        """Why an ingress `from` entry names nothing enclave can match, or None."""
        if source in ("internet", "operators") or source in self.roles or self.role_of_host(source):
            return None
        if "," in source:
            listed = ", ".join(part.strip() for part in source.split(","))
            return f"{source!r}: several sources are a list, e.g. from: [{listed}]"
        if "/" in source or ":" in source or re.fullmatch(r"[\d.]+", source):
            try:
                net = ipaddress.ip_network(source, strict=True)
            except ValueError as exc:
                return f"{source!r} is not a valid CIDR ({exc})"
            unusable = never_a_source(net)
            if unusable:
                return f"{source!r} can never match: it is {unusable}"
            # CIDR sources are matched on the public interface: VPC addresses never arrive there.
            if net.version == 4 and self.vpc_ip_range.subnet_of(net):
                return (
                    f"{source!r} also covers vpcIpRange {self.vpc_ip_range}, but a CIDR is matched on the public "
                    "interface only; write `internet` for anyone on the Internet, or a range outside the VPC"
                )
            if net.version == 4 and net.overlaps(self.vpc_ip_range):
                return f"{source!r} lies inside vpcIpRange {self.vpc_ip_range}; name the role or host instead"
            return None
        if source == "outside":
            return ("'outside' is only for tests (every address outside vpcIpRange and operators); ingress admits "
                    "roles, hosts, internet, operators or CIDRs")
        if source == "neighbor":
            return (
                "'neighbor' is only for tests (another tenant on the private network, which nothing admits); "
                "ingress admits roles, hosts, internet, operators or CIDRs"
            )
        return self._host_problem(source) or (
            f"{source!r} is not a role, a host (<role>-<n>), internet, operators or a CIDR; "
            f"known roles: {', '.join(self.roles)}"
        )

    def _endpoint_problem(self, name: str, source: bool) -> str | None:
        """Why a test's `from` (source=True) or `to` names nothing the test could probe, or None."""
        if name in ("internet", "operators", "neighbor", "outside"):
            return None if source else f"{name!r} cannot be a destination; name a role or a host"
        if name in self.roles:
            if self.roles[name].count == 0:
                return f"role {name!r} has count 0, so the test could never run; remove the test or raise the count"
            return None
        if self.role_of_host(name):
            return None
        if source and ("/" in name or ":" in name or re.fullmatch(r"[\d.]+", name)):
            return (
                f"{name!r}: a test starts from a role, a host, internet, operators, outside or neighbor, not an "
                "address range (outside is every address outside vpcIpRange and operators)"
            )
        kinds = "a role, a host (<role>-<n>), outside, internet, operators or neighbor" if source else "a role or a host (<role>-<n>)"
        return self._host_problem(name) or f"{name!r} is not {kinds}; known roles: {', '.join(self.roles)}"


# -------------------------------------------------------------------------------------------- loading

# Keys that live in the stack file but are not part of the model: the SSH private keys (the current one and,
# while rotating, the previous one) are Pulumi secrets read by the program itself (never by the CLI, which
# cannot decrypt them).
SECRET_KEYS = frozenset({"sshPrivateKey", "sshPreviousPrivateKey"})


def _what(value: object) -> str:
    """How a YAML value reads back to its author: `ingress:` left empty is nothing, not 'None'."""
    if value is None:
        return "nothing (the key is left empty)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _looks_like_port(key: object) -> bool:
    try:
        PortSpec.parse(key)
    except ValueError:
        return False
    return True


def _friendly(error: dict[str, Any], model: type[BaseModel]) -> str:
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        key = error["loc"][-1]
        if _looks_like_port(key):
            # `{from: wordpress, ports: tcp/3306, tcp/33060}`: YAML reads the second port as a key
            return f"unknown key {key!r}: a port? several ports are one list, e.g. ports: [tcp/3306, tcp/33060]"
        return f"unknown key {key!r}; check its spelling"
    if kind == "missing":
        return "required key is missing"
    # pydantic's wording names Python types; say it in the stack file's terms, with the shape to write
    if kind == "list_type":
        return f"should be a list ([a, b], or one `- item` per line), not {_what(value)}"
    if kind in ("dict_type", "model_type"):
        return f"should be a mapping ({{key: value, …}}, or one `key: value` per line), not {_what(value)}"
    if kind == "too_short" and not value:
        return "is empty; give at least 1 item"
    if kind == "too_long":
        context = error.get("ctx") or {}
        actual = len(value) if isinstance(value, (list, dict)) else context.get("actual_length")
        return f"has {actual} items, over the limit of {context.get('max_length')} (docs/stack-file.md: Limits)"
    if kind == "string_type":
        return f"should be text, not {_what(value)}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = {"sources": "from", "vpc_ip_range": "vpcIpRange", "ssh_user": "sshUser"}.get(part, part)
            if name.startswith("[") or name in ("function-after", "function-before"):
                continue
            out += ("." if out else "") + name
    return out


def load_config(values: dict[str, Any], source: str = "stack") -> StackConfig:
    """Validate the `enclave:` keys (prefix already removed) and return the stack, or raise StackError."""
    values = {k: v for k, v in values.items() if k not in SECRET_KEYS}
    try:
        stack = StackConfig.model_validate(values)
    except ValidationError as exc:
        issues = [
            StackIssue(NAMESPACE + ":" + _path(tuple(err["loc"])), _friendly(dict(err), StackConfig))
            for err in exc.errors()
        ]
        raise StackError(issues, source) from None
    issues = stack.check_references()
    if issues:
        raise StackError(issues, source)
    return stack


# The longest DigitalOcean droplet name; droplets are named <stack>-<role>-<n>, which is also their hostname.
DROPLET_NAME_MAX = 63


def droplet_name_issues(stack_name: str, stack: StackConfig) -> list[StackIssue]:
    """Roles whose last droplet, `<stack>-<role>-<count>`, would have a name DigitalOcean refuses. It depends on
    the stack's name, so the program and `enclave plan --stack` check it after `load_config`."""
    issues = []
    for role_name, role in stack.roles.items():
        longest = f"{stack_name}-{role_name}-{role.count}"
        if len(longest) > DROPLET_NAME_MAX:
            issues.append(
                StackIssue(
                    f"{NAMESPACE}:roles.{role_name}",
                    f"droplet name {longest!r} is longer than {DROPLET_NAME_MAX} characters; shorten the role "
                    "or the stack name",
                )
            )
    return issues


def stack_name_issues(stack_name: str, stack: StackConfig | None, key: str = "(stack name)") -> list[StackIssue]:
    """Why `stack_name` cannot name a stack enclave builds, or []: it becomes part of droplet names, tags and the
    ssh config's `Host` aliases, so it is a hostname label. The program and the CLI call this same check."""
    shown = repr(stack_name) if len(stack_name) <= 80 else f"{stack_name[:60]!r}… ({len(stack_name)} characters)"
    if len(stack_name) > DROPLET_NAME_MAX - len("-r-1"):
        return [
            StackIssue(
                key,
                f"{shown} is {len(stack_name)} characters; droplets are named <stack>-<role>-<n>, at most "
                f"{DROPLET_NAME_MAX} characters, so a stack name has at most {DROPLET_NAME_MAX - len('-r-1')}",
            )
        ]
    if not HOSTNAME_LABEL.fullmatch(stack_name):
        return [
            StackIssue(
                key,
                f"{shown} becomes part of droplet host names and tags: use lower-case letters, digits and '-', "
                "not starting or ending with '-' (e.g. `pulumi stack rename prod`, or name the file "
                "Pulumi.prod.yaml)",
            )
        ]
    return droplet_name_issues(stack_name, stack) if stack else []


def enclave_keys(pulumi_config: dict[str, Any], source: str = "stack") -> dict[str, Any]:
    """The `enclave:*` entries of a stack file's `config:` map, prefix removed.

    Other namespaces (e.g. `digitalocean:token`) belong to providers and are left alone. A key without
    a namespace is rejected, because `pulumi config` would read it as `enclave:<key>` anyway.
    """
    out: dict[str, Any] = {}
    issues = []
    for key, value in pulumi_config.items():
        namespace, sep, name = str(key).partition(":")
        if not sep:
            issues.append(StackIssue(str(key), f"write it as {NAMESPACE}:{key} (stack config keys are namespaced)"))
        elif namespace == NAMESPACE:
            out[name] = value
    if issues:
        raise StackError(issues, source)
    return out
