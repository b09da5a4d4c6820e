"""What a stack with private roles (`public: false`) needs beyond its rules, said before anything is created.

A droplet without public networking reaches the Internet only through the VPC's NAT gateway (when it is the
VPC's default route: docs/operations.md "Private roles"). Its first boot installs `ipset` and `iptables` with
apt (docs/how-a-push-works.md "What a droplet needs"), so without the gateway, without `enclave:aptProxy` and
on a stock image (a slug such as `ubuntu-24-04-x64`, not the numeric id of a snapshot or custom image that
already has the tools) its install can only fail, and so would every push.

Pure logic: no Pulumi, no I/O.
"""

from __future__ import annotations

import re

from config.schema import StackConfig

# DigitalOcean names its own images by slug; snapshots and custom images by a numeric id.
CUSTOM_IMAGE = re.compile(r"[0-9]+")


def install_warnings(stack: StackConfig) -> list[str]:
    """One line per private role whose droplets could not install the packages the host program needs."""
    if stack.nat_gateway is not None or stack.apt_proxy is not None:
        return []
    out = []
    for name in stack.private_roles():
        role = stack.roles[name]
        image = role.image or stack.image
        if role.count and not CUSTOM_IMAGE.fullmatch(image):
            out.append(
                f"roles.{name}: public: false with natGateway: false and no aptProxy, on the stock image {image!r}: "
                "its droplets reach no package mirror, so their first boot cannot install ipset and iptables and "
                "every push to them fails; set enclave:aptProxy, remove natGateway: false, or give the role an "
                "image that has them (a snapshot id as its `image`)"
            )
    return out
