"""Ports in a stack file: `tcp/80`, `udp/53`, `tcp/8000-8100`, `icmp`, a service name, or a list of these.

`PortSpec` is the one port type the whole program uses (compiler, render, verifier, lab); this module parses
what a user writes into it, naming the shape to write when it cannot, and resolves service names: the
built-in table (config/services.py) and the stack's own `enclave:services`, which `load_config` passes to
pydantic as validation context. No Pulumi import here.

For users: docs/stack-file.md (ports, services).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationInfo

from .services import BUILTIN_SERVICES, SERVICE_NAME
from .suggest import did_you_mean

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


def to_list(value: object) -> object:
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


def parse_ports(value: object, info: ValidationInfo) -> object:
    if isinstance(value, str) and "," in value:  # `ports: tcp/80,443` is one string, not a list
        raise ValueError(f"{value!r}: several ports are a list; write ports: [{', '.join(_split_ports(value))}]")
    value = to_list(value)
    if not isinstance(value, list):
        return value
    services = _services(info)
    return list(dict.fromkeys(port for item in value for port in _port_or_service(item, services)))


def parse_port(value: object, info: ValidationInfo) -> PortSpec:
    ports = _port_or_service(value, _services(info))
    if len(ports) != 1:
        raise ValueError(
            f"{value!r} is {' and '.join(map(str, ports))}; a test probes one port: write one of them, e.g. {ports[-1]}"
        )
    return ports[0]


BUILTIN_PORTS: dict[str, tuple[PortSpec, ...]] = {
    name: tuple(PortSpec.parse(p) for p in ports) for name, ports in BUILTIN_SERVICES.items()
}


def parse_test_port(value: object, info: ValidationInfo) -> object:
    return value if value == "any" else parse_port(value, info)


# Every tcp and udp port, the ports a `port: any` test covers.
ANY_PORTS = (PortSpec("tcp", 1, 65535), PortSpec("udp", 1, 65535))


def stack_services(raw: object) -> dict[str, tuple[PortSpec, ...]]:
    """The service names a stack's ports may use: the built-in ones and those `enclave:services` defines well (a
    malformed definition is reported by the schema where it is written, and is no service meanwhile)."""
    services = dict(BUILTIN_PORTS)
    if isinstance(raw, dict):
        for name, ports in raw.items():
            if not isinstance(name, str) or name in services or not SERVICE_NAME.fullmatch(name):
                continue
            try:
                parsed = parse_ports(ports, None)  # type: ignore[arg-type]
            except ValueError:
                continue
            if isinstance(parsed, list) and parsed:
                services[name] = tuple(parsed)
    return services
