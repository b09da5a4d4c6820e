"""Named port lists (`ports: [statsd]`): the built-in table and the stack's own `enclave:services`.

A service name stands for its ports wherever a port is written (ingress, egress, a test's one port). The built-in
table is documented in docs/stack-file.md ("Services"); a stack may add names, and may not redefine a built-in
one (a `postgresql` that meant another port in one stack than in the next would mislead whoever reads both).
"""

from __future__ import annotations

import re

# name -> ports as written in a stack file; docs/stack-file.md lists this table (tests/unit/test_language.py checks it).
BUILTIN_SERVICES: dict[str, tuple[str, ...]] = {
    "ssh": ("tcp/22",),
    "http": ("tcp/80",),
    "https": ("tcp/443",),
    "http-alt": ("tcp/8080",),
    "dns": ("tcp/53", "udp/53"),
    "ntp": ("udp/123",),
    "smtp": ("tcp/25",),
    "mysql": ("tcp/3306",),
    "postgresql": ("tcp/5432",),
    "redis": ("tcp/6379",),
    "memcached": ("tcp/11211",),
    "mongodb": ("tcp/27017",),
    "statsd": ("udp/8125",),
    "syslog": ("udp/514",),
    "prometheus": ("tcp/9090",),
    "node-exporter": ("tcp/9100",),
}

# A service name: a word a port can never be (tcp/80, 80, icmp), lower-case like role names.
SERVICE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
MAX_SERVICES = 100
