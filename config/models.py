"""The stack file's pydantic models: what a user may write under `config:` with the `enclave:` prefix, key by key.

pydantic validates shapes and values (unknown keys, bad CIDRs, negative counts…) with the validators below;
what needs the whole stack is config/checks.py, the wording of pydantic's errors config/messages.py, and
config/schema.py loads a stack through all three. The limits on what a stack may expand to are here, beside
the fields they bound. No Pulumi import here.

For users: docs/stack-file.md (every key, what is refused, the limits).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic.alias_generators import to_camel

from .ports import ANY_PORTS, PortSpec, parse_ports, parse_test_port, to_list
from .services import BUILTIN_SERVICES, MAX_SERVICES, SERVICE_NAME

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

Ports = Annotated[list[PortSpec], BeforeValidator(parse_ports), Field(min_length=1, max_length=MAX_PORTS_PER_ENTRY)]
SourceList = Annotated[list[str], BeforeValidator(to_list), Field(min_length=1)]

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
# (the tags are skipped in key paths: `_path` in config/messages.py).
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




class PolicyTest(_Strict):
    """An expectation checked against the compiled policy (plan), proved for every packet by the verifier
    (plan), and probed with real packets (lab). `port` is one port, a range, or `any` (every tcp and udp port);
    `from: outside` is every address outside vpcIpRange and operators."""

    sources: str = Field(alias="from")
    to: str
    port: Annotated[PortSpec | Literal["any"], BeforeValidator(parse_test_port)]
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
        value = to_list(value)
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

    # ------------------------------------------ what the checks, the compiler and the program ask of a stack

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
