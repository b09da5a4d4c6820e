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
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

from .names import set_name_collisions
from .services import BUILTIN_SERVICES, MAX_SERVICES, SERVICE_NAME
from .suggest import closest, did_you_mean

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
# data, which DigitalOcean caps at 64 KiB: 150 IPv6 operators on a bastion with a non-root user fill ~56 KiB,
# leaving ~8 KiB for the host program to grow (tests/unit/test_schema.py checks the worst case).
MAX_OPERATORS = 150
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
            raise ValueError(f"{value!r}: several ports are a list; write ports: [{', '.join(_split_ports(text))}]")
        swapped = re.fullmatch(r"([0-9]+(?:-[0-9]+)?)/(tcp|udp)", text)
        if swapped:  # firewalld's and /etc/services' order
            raise ValueError(f"{value!r}: enclave writes the protocol first; write {swapped[2]}/{swapped[1]}")
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


def _split_ports(text: str) -> list[str]:
    """`tcp/80,443` -> ['tcp/80', 'tcp/443']: each bare number after the first takes the protocol before it."""
    out, proto = [], "tcp"
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "/" in part:
            proto = part.partition("/")[0]
            out.append(part)
        else:
            out.append(part if part == "icmp" else f"{proto}/{part}")
    return out


def _to_list(value: object) -> object:
    return [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value


def _services(info: ValidationInfo | None) -> dict[str, tuple[PortSpec, ...]]:
    """The service names a stack may write for ports: the built-in table and its own `enclave:services`."""
    context = info.context if info is not None else None
    if isinstance(context, dict) and "services" in context:
        return context["services"]  # type: ignore[no-any-return]
    return BUILTIN_PORTS


def _port_or_service(value: object, services: dict[str, tuple[PortSpec, ...]]) -> tuple[PortSpec, ...]:
    if isinstance(value, str) and value.strip().lower() in services:
        return services[value.strip().lower()]
    try:
        return (PortSpec.parse(value),)
    except ValueError as exc:
        if isinstance(value, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", value.strip()):
            raise ValueError(
                f"{value!r} is not a port or a service{did_you_mean(value.strip().lower(), services)}; write "
                "tcp/80, udp/53, tcp/8000-8100, icmp or a service name (built in: "
                f"{', '.join(BUILTIN_SERVICES)}; more under enclave:services)"
            ) from None
        raise exc from None


def _parse_ports(value: object, info: ValidationInfo) -> object:
    if isinstance(value, str) and "," in value:  # `ports: tcp/80,443` is one string, not a list
        raise ValueError(f"{value!r}: several ports are a list; write ports: [{', '.join(_split_ports(value))}]")
    value = _to_list(value)
    if not isinstance(value, list):
        return value
    services = _services(info)
    return list(dict.fromkeys(port for item in value for port in _port_or_service(item, services)))


def _parse_port(value: object, info: ValidationInfo) -> PortSpec:
    ports = _port_or_service(value, _services(info))
    if len(ports) != 1:
        raise ValueError(
            f"{value!r} is {' and '.join(map(str, ports))}; a test probes one port: write one of them, e.g. {ports[-1]}"
        )
    return ports[0]


Ports = Annotated[list[PortSpec], BeforeValidator(_parse_ports), Field(min_length=1, max_length=MAX_PORTS_PER_ENTRY)]
Port = Annotated[PortSpec, BeforeValidator(_parse_port)]
SourceList = Annotated[list[str], BeforeValidator(_to_list), Field(min_length=1)]

BUILTIN_PORTS: dict[str, tuple[PortSpec, ...]] = {
    name: tuple(PortSpec.parse(p) for p in ports) for name, ports in BUILTIN_SERVICES.items()
}

# A description is carried into iptables comments, which hold 255 bytes and are written between double quotes
# in the rule files: printable ASCII without `"` and `\` survives iptables-restore and iptables-save unchanged.
MAX_DESCRIPTION = 200
DESCRIPTION_TEXT = re.compile(r'[ !#-\[\]-~]*')


def _is_description(value: str | None) -> str | None:
    if value is None:
        return None
    bad = next((c for c in value if not DESCRIPTION_TEXT.fullmatch(c)), None)
    if bad is not None:
        raise ValueError(
            f"{bad!r} cannot be in a description: it becomes an iptables comment, which takes printable ASCII "
            "without double quotes and backslashes; reword it"
        )
    if len(value) > MAX_DESCRIPTION:
        raise ValueError(f"is {len(value)} characters; a description is at most {MAX_DESCRIPTION} (it becomes an "
                         "iptables comment, at most 255 with the rule's key)")
    return value.strip() or None




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
    description: str | None = None

    _description = field_validator("description")(_is_description)


class Egress(_Strict):
    """Where a role with an egress allowlist may open connections, and on which ports."""

    to: SourceList
    ports: Ports
    description: str | None = None

    _description = field_validator("description")(_is_description)


def _egress_kind(value: object) -> str:
    return "allowlist" if isinstance(value, list) else "word"


# `open`, `restricted`, or an allowlist; the tag picks one reading, so an error names what was written
# (the tags are skipped in key paths: `_path`).
EgressSetting = Annotated[
    Union[Annotated[Literal["open", "restricted"], Tag("word")], Annotated[list[Egress], Tag("allowlist")]],
    Discriminator(_egress_kind),
]


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
    # false: droplets without public networking (DigitalOcean "private droplets"): one interface, the private
    # one, named `interfaces.privateOnly`; reached only through a bastion, the Internet only through the
    # stack's NAT gateway. Fixed at creation: changing it replaces the role's droplets.
    public: bool = True
    egress: EgressSetting = "open"
    ingress: list[Ingress] = Field(default_factory=list, max_length=MAX_INGRESS_PER_ROLE)
    description: str | None = None

    _description = field_validator("description")(_is_description)

    @property
    def allowlist(self) -> list[Egress] | None:
        """The egress allowlist, or None for `open` and `restricted`."""
        return self.egress if isinstance(self.egress, list) else None

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
    # A droplet created without public networking has one interface, the private one, and DigitalOcean names it
    # eth0, not eth1 (docs.digitalocean.com/products/droplets/details/private-droplets: "eth0: Private IPv4 Only").
    private_only: str = "eth0"

    @field_validator("public", "private", "private_only")
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


# A VPC NAT gateway's size (DigitalOcean sells it in units; 1 is the smallest) and its idle timeouts, which
# DigitalOcean defaults when they are not given (the provider leaves them computed).
class NatGateway(_Strict):
    """`enclave:natGateway`: the VPC NAT gateway private roles reach the Internet through."""

    size: int = Field(default=1, ge=1, le=100)
    tcp_timeout_seconds: int | None = Field(default=None, ge=1, le=86_400)
    udp_timeout_seconds: int | None = Field(default=None, ge=1, le=86_400)
    icmp_timeout_seconds: int | None = Field(default=None, ge=1, le=86_400)


def _nat_gateway(value: object) -> object:
    # `natGateway: false` opts out, `true` (or nothing) takes the defaults, a mapping sets size and timeouts
    # (the Pulumi CLI hands a program booleans as text)
    if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
        return NatGateway()
    if value is False or (isinstance(value, str) and value.strip().lower() == "false"):
        return None
    return value


def _parse_test_port(value: object, info: ValidationInfo) -> object:
    return value if value == "any" else _parse_port(value, info)


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


class EgressEssentials(_Strict):
    """What a role with an egress allowlist may always reach, so the droplet keeps working; each can be switched
    off (`enclave:egressEssentials: {ntp: false}`). docs/stack-file.md "Egress allowlists" says why each exists."""

    dns: bool = True  # DigitalOcean's resolvers, tcp and udp 53
    metadata: bool = True  # the metadata service, 169.254.169.254 tcp/80 (cloud-init, the droplet agent)
    ntp: bool = True  # udp/123 out of the public interface (systemd-timesyncd's pool is not a fixed address)


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
    services: dict[str, Ports] = Field(default_factory=dict, max_length=MAX_SERVICES)
    egress_essentials: EgressEssentials = Field(default_factory=EgressEssentials)
    log_drops: bool = False
    cloud_firewall: bool = False
    # How long one host's push (`pulumi up`'s local command) may keep dialing and retrying, booting droplet
    # included, before it fails naming the host. A fresh droplet needs a minute or two before sshd answers.
    push_timeout: int = Field(default=600, ge=60, le=86_400)
    # apt's HTTP(S) proxy on every droplet (cloud-init's apt module), for droplets that reach no package mirror
    # themselves: the first boot and every push install ipset (and iptables on Debian) through it.
    apt_proxy: str | None = None
    # Per host, a counter that is part of its push's input: raising it re-runs that host's push as an update,
    # which keeps the previous run's output (the bastion it was last confirmed through). `enclave audit` prints
    # the `pulumi config set --path 'repush["<host>"]' N` that re-pushes a drifted host.
    repush: dict[str, int] = Field(default_factory=dict, max_length=25_000)

    @field_validator("repush")
    @classmethod
    def _repush_counts(cls, value: dict[str, int]) -> dict[str, int]:
        for host, count in value.items():
            if not 0 <= count <= 1_000_000:
                raise ValueError(f"repush[{host!r}] is {count}: a re-push counter is 0 or more (raise it by one)")
        return value
    # Only used when a role has `public: false`; None (`natGateway: false`) when private droplets need no Internet.
    nat_gateway: Annotated[NatGateway | None, BeforeValidator(_nat_gateway)] = Field(default_factory=NatGateway)

    @field_validator("services", mode="before")
    @classmethod
    def _service_names(cls, services: object) -> object:
        if isinstance(services, dict):
            for name in services:
                if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
                    raise ValueError(f"service name {name!r} must be lower-case letters, digits and '-', starting "
                                     "with a letter, at most 40 characters (e.g. app, gossip)")
                if name in BUILTIN_SERVICES:
                    raise ValueError(f"service {name!r} is built in ({', '.join(BUILTIN_SERVICES[name])}); "
                                     "give your service another name")
                if name in ("icmp", "tcp", "udp"):
                    raise ValueError(f"service name {name!r} is a protocol; give your service another name")
        return services

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

    def private_roles(self) -> list[str]:
        """Roles whose droplets have no public networking (`public: false`)."""
        return [name for name, role in self.roles.items() if not role.public]

    def public_interface(self, role: str) -> str | None:
        """The role's droplets' public interface, or None for a private role (it has none)."""
        return self.interfaces.public if self.roles[role].public else None

    def private_interface(self, role: str) -> str:
        """The interface on the VPC: eth1 beside a public eth0, eth0 on a private droplet (interfaces.privateOnly)."""
        return self.interfaces.private if self.roles[role].public else self.interfaces.private_only

    def uses_nat_gateway(self) -> bool:
        """Whether the stack creates a VPC NAT gateway: it has private droplets and did not opt out."""
        return any(self.roles[r].count for r in self.private_roles()) and self.nat_gateway is not None

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
            for i, entry in enumerate(role.allowlist or []):
                for destination in entry.to:
                    problem = self._destination_problem(role_name, destination, entry.ports)
                    if problem:
                        bad(f"roles.{role_name}.egress[{i}].to", problem)
            for i, tag in enumerate(role.tags):
                if tag.startswith("enclave"):
                    bad(f"roles.{role_name}.tags[{i}]", f"tag {tag!r}: tags starting with 'enclave' are enclave's own")

        issues += [StackIssue(prefix + path, message) for path, message in self._private_role_issues()]

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

        for host in self.repush:
            role_name, _, number = host.rpartition("-")
            if role_name not in self.roles or not number.isdigit() or not 1 <= int(number) <= self.roles[role_name].count:
                bad(f"repush.{host}", f"no host {host!r} in this stack (hosts are <role>-<n>); remove the entry: "
                    f"`pulumi config rm --path 'repush[\"{host}\"]'`")

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
            outside = test.to == "internet" or "/" in test.to
            if outside and test.sources in ("internet", "operators", "neighbor", "outside"):
                bad(f"tests[{i}].from", f"a test to {test.to} checks a stack host's egress: start it from a role or a host")
            if outside and (test.port == "any" or test.port.low != test.port.high):
                bad(f"tests[{i}].port", f"a test to {test.to} checks one port (e.g. tcp/443); `any` and ranges are for "
                                        "tests to a role or a host, which the verifier proves for every port")
            ends = self._hosts_named(test.sources)
            if len(ends) == 1 and ends == self._hosts_named(test.to):
                bad(
                    f"tests[{i}]",
                    f"from and to are the same single host ({ends.pop()}): a host reaches itself over loopback, "
                    "which enclave always leaves open; name another source",
                )
        return issues

    def _private_role_issues(self) -> list[tuple[str, str]]:
        """What a role without public networking cannot have: nothing public reaches it, nothing public is on it."""
        out: list[tuple[str, str]] = []
        for role_name in self.private_roles():
            role = self.roles[role_name]
            key = f"roles.{role_name}"
            if role.bastion:
                out.append((f"{key}.public", "a bastion is what operators SSH to from the Internet, so it needs public "
                            "networking; remove `public: false` or `bastion: true`"))
            if role.ipv6:
                out.append((f"{key}.ipv6", "a droplet without public networking has no IPv6 address (the VPC is "
                            "IPv4 only); remove `ipv6: true` or `public: false`"))
            for i, rule in enumerate(role.ingress):
                for source in rule.sources:
                    if source in ("internet", "operators") or (source not in self.roles and not self.role_of_host(source)
                                                               and self._source_problem(source) is None):
                        out.append((f"{key}.ingress[{i}].from", f"{source!r} arrives on a public interface, which a "
                                    f"role with `public: false` does not have, so nothing public can reach it; admit "
                                    "a role or host of the stack, or remove `public: false`"))
        if self.private_roles() and not self.bastion_roles():
            out.append((f"roles.{self.private_roles()[0]}.public", "droplets without public networking are reached "
                        "only through a bastion, and the stack has none; add a role with `bastion: true`"))
        return out

    def _hosts_named(self, name: str) -> set[str]:
        if name in self.roles:
            return {f"{name}-{n}" for n in range(1, self.roles[name].count + 1)}
        return {name} if self.role_of_host(name) else set()

    def _names(self) -> list[str]:
        """Every role and host name, for did-you-mean."""
        return [*self.roles, *(f"{r}-{n}" for r, spec in self.roles.items() for n in range(1, min(spec.count, 50) + 1))]

    def admits(self, destination_role: str, source_role: str, port: PortSpec) -> bool:
        """Whether `destination_role`'s ingress (or the built-in SSH through a bastion) admits every host of
        `source_role` on `port`: what an egress allowlist entry naming the role must agree with."""
        if port.proto == "tcp" and port.low == port.high == 22 and self.roles[source_role].bastion:
            return True
        return any(
            (source_role in rule.sources or "all" in rule.sources) and any(p.contains(port) for p in rule.ports)
            for rule in self.roles[destination_role].ingress
        )

    def _destination_problem(self, role_name: str, destination: str, ports: list[PortSpec]) -> str | None:
        """Why an egress `to` entry of `role_name` names nothing enclave can allow, or None."""
        if destination == "internet":
            return None
        if destination in self.roles or destination == "all" or self.role_of_host(destination):
            if destination == "all":
                targets = [r for r, spec in self.roles.items() if spec.count]
            else:
                targets = [destination if destination in self.roles else str(self.role_of_host(destination))]
            refused = [f"{target} on {port}" for target in targets for port in ports
                       if not self.admits(target, role_name, port)]
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
            listed = ", ".join(part.strip() for part in destination.split(","))
            return f"{destination!r}: several destinations are a list, e.g. to: [{listed}]"
        if "/" in destination or ":" in destination or re.fullmatch(r"[\d.]+", destination):
            try:
                net = ipaddress.ip_network(destination, strict=True)
            except ValueError as exc:
                return f"{destination!r} is not a valid CIDR ({exc})"
            if net.prefixlen == 0:
                return f"{destination!r} is every address; write `internet`"
            if net.is_loopback or net.is_multicast:
                return f"{destination!r} is {'loopback (always open)' if net.is_loopback else 'multicast'}; it is not a destination"
            if net.version == 4 and net.overlaps(self.vpc_ip_range) and not net.subnet_of(self.vpc_ip_range):
                return (f"{destination!r} covers vpcIpRange {self.vpc_ip_range} and beyond: the VPC is reached on "
                        "the private interface, the rest on the public one; write the two ranges apart")
            if net.version == 6 and not self.roles[role_name].ipv6:
                return (f"{destination!r} is an IPv6 range but role {role_name} has no IPv6 (ipv6: false); set "
                        "ipv6: true on the role or give an IPv4 range")
            return None
        return self._host_problem(destination) or (
            f"{destination!r} is not a role, a host (<role>-<n>), all, internet or a CIDR"
            f"{did_you_mean(destination, [*self._names(), 'all', 'internet'])}; known roles: {', '.join(self.roles)}"
        )

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
        if source in ("internet", "operators", "all") or source in self.roles or self.role_of_host(source):
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
            f"{source!r} is not a role, a host (<role>-<n>), all, internet, operators or a CIDR"
            f"{did_you_mean(source, [*self._names(), 'all', 'internet', 'operators'])}; "
            f"known roles: {', '.join(self.roles)}"
        )

    def _endpoint_problem(self, name: str, source: bool) -> str | None:
        """Why a test's `from` (source=True) or `to` names nothing the test could probe, or None."""
        if name == "internet" and not source:
            return None  # the lab's `internet` answers on every probed port
        if name in ("internet", "operators", "neighbor", "outside"):
            return None if source else f"{name!r} cannot be a destination; name a role, a host, internet or a CIDR"
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
        if not source and ("/" in name or ":" in name or re.fullmatch(r"[\d.]+", name)):
            try:
                net = ipaddress.ip_network(name, strict=True)
            except ValueError as exc:
                return f"{name!r} is not a valid CIDR ({exc})"
            if net.version != 4 or net.overlaps(self.vpc_ip_range) or never_a_source(net) or net.prefixlen == 0:
                return (f"{name!r}: a test's CIDR destination is an IPv4 range on the Internet (outside vpcIpRange "
                        f"{self.vpc_ip_range}, not link-local, loopback or multicast; for everything write internet)")
            return None
        kinds = ("a role, a host (<role>-<n>), outside, internet, operators or neighbor" if source
                 else "a role, a host (<role>-<n>), internet or a CIDR")
        words = ["outside", "internet", "operators", "neighbor"] if source else ["internet"]
        return self._host_problem(name) or (
            f"{name!r} is not {kinds}{did_you_mean(name, [*self._names(), *words])}; known roles: {', '.join(self.roles)}"
        )


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


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model whose key `loc` ends in (for did-you-mean on an unknown key), following fields, lists and maps."""
    annotation: Any = StackConfig
    for part in loc[:-1]:
        while True:  # unwrap Annotated, Optional/Union (the egress allowlist) to the model or container inside
            origin = get_origin(annotation)
            if origin is Annotated:
                annotation = get_args(annotation)[0]
            elif origin is Union:
                args = [a for a in get_args(annotation) if get_origin(a) in (list, dict, Annotated) or _is_model(a)]
                if not args:
                    return None
                annotation = args[-1]
            else:
                break
        if _is_model(annotation) and isinstance(part, str):
            field = next((f for name, f in annotation.model_fields.items() if part in (name, f.alias)), None)
            if field is None:
                continue  # a tag of a union (`allowlist`)
            annotation = field.annotation
        elif get_origin(annotation) is list and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif isinstance(part, str) and part in ("allowlist", "word"):
            continue
        else:
            return None
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation if _is_model(annotation) else None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _friendly(error: dict[str, Any], model: type[BaseModel]) -> str:
    kind = error["type"]
    value = error.get("input")
    context = error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = error["loc"][-1]
        if _looks_like_port(key):
            # `{from: wordpress, ports: tcp/3306, tcp/33060}`: YAML reads the second port as a key
            return f"unknown key {key!r}: a port? several ports are one list, e.g. ports: [tcp/3306, tcp/33060]"
        owner = _model_at(tuple(error["loc"]))
        known = _keys_of(owner) if owner is not None else []
        hint = did_you_mean(str(key), known)
        listed = f" (known keys here: {', '.join(known)})" if known and not hint else ""
        return f"unknown key {key!r}{hint or '; check its spelling'}{listed}"
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
        actual = len(value) if isinstance(value, (list, dict)) else context.get("actual_length")
        return f"has {actual} items, over the limit of {context.get('max_length')} (docs/stack-file.md: Limits)"
    if kind == "string_type":
        return f"should be text, not {_what(value)}"
    if kind == "string_too_short":
        return "is empty; write a value"
    if kind == "literal_error":
        expected = context.get("expected", "")
        words = [w.strip(" '") for w in str(expected).replace(" or ", ",").split(",") if w.strip(" '")]
        hint = did_you_mean(str(value), words) if isinstance(value, str) else ""
        return f"{_what(value)} is not one of {', '.join(words)}{hint}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"{_what(value)} is too small; the lowest allowed is {context.get('ge', context.get('gt'))}"
    if kind in ("less_than_equal", "less_than"):
        return f"{_what(value)} is too large; the highest allowed is {context.get('le', context.get('lt'))}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"should be a whole number, not {_what(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"should be true or false, not {_what(value)}"
    if kind.startswith(("ip_v4", "ip_v6", "ip_any")):
        return f"{_what(value)} is not an address range; e.g. 198.51.100.7/32"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return f"{_what(value)} is not open, restricted or a list of {{to, ports}} entries"
    message = str(error["msg"]).removeprefix("Value error, ")
    # any other wording of the validation library, put in the stack's terms
    return message.replace("Input should be", "should be").replace("Input", "the value")


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = {"sources": "from"}.get(part, to_camel(part) if "_" in part else part)
            if name.startswith("[") or name in ("function-after", "function-before", "allowlist", "word"):
                continue
            out += ("." if out else "") + name
    return out


def stack_services(raw: object) -> dict[str, tuple[PortSpec, ...]]:
    """The service names a stack's ports may use: the built-in ones and those `enclave:services` defines well (a
    malformed definition is reported by the schema where it is written, and is no service meanwhile)."""
    services = dict(BUILTIN_PORTS)
    if isinstance(raw, dict):
        for name, ports in raw.items():
            if not isinstance(name, str) or name in services or not SERVICE_NAME.fullmatch(name):
                continue
            try:
                parsed = _parse_ports(ports, None)  # type: ignore[arg-type]
            except ValueError:
                continue
            if isinstance(parsed, list) and parsed:
                services[name] = tuple(parsed)
    return services


def load_config(values: dict[str, Any], source: str = "stack") -> StackConfig:
    """Validate the `enclave:` keys (prefix already removed) and return the stack, or raise StackError."""
    values = {k: v for k, v in values.items() if k not in SECRET_KEYS}
    try:
        stack = StackConfig.model_validate(values, context={"services": stack_services(values.get("services"))})
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
