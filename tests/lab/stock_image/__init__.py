"""A stock DigitalOcean image, emulated for tests: /usr/sbin without the commands the image lacks.

No stock image ships `ipset` (Ubuntu 22.04/24.04, Debian 12/13) and Debian's has no `iptables`; `nftables` is on
all of them. A test host runs its commands through `prefix(view)`: inside `ip netns exec`'s own mount namespace,
`enter.sh` binds VIEW/sbin over /usr/sbin, a directory of links to this machine's commands minus the hidden ones,
plus a pretend `apt-get` (first on enclave's PATH) that "installs" a package by linking its commands back.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The commands of each package the stock image lacks, as they are named in /usr/sbin (alternatives included).
PACKAGES = {
    "ipset": re.compile(r"ipset$"),
    "iptables": re.compile(r"(ip6?tables|xtables)(-.*)?$"),
    "nftables": re.compile(r"nft$"),
}


def make_view(root: Path, missing: tuple[str, ...] = ("ipset",), mirror: str = "up") -> Path:
    """A stock image's /usr/sbin under `root`: every command of this machine but those of the `missing`
    packages; the pretend mirror can install the packages named in PACKAGES."""
    view = root / "stock-image"
    sbin, real, stock = view / "sbin", view / "real", view / "sbin" / ".stock"
    for d in (real, stock / "packages"):
        d.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in Path("/usr/sbin").iterdir())
    for package, pattern in PACKAGES.items():
        (stock / "packages" / package).write_text("".join(f"{n}\n" for n in names if pattern.fullmatch(n)))
    hidden = {n for n in names for p in missing if PACKAGES[p].fullmatch(n)}
    for n in names:
        if n not in hidden and n != "apt-get":
            (sbin / n).symlink_to(real / n)
    (sbin / "apt-get").write_bytes((HERE / "apt-get").read_bytes())
    (sbin / "apt-get").chmod(0o755)
    (stock / "real").write_text(f"{real}\n")
    (stock / "mirror").write_text(f"{mirror}\n")
    (stock / "calls").touch()
    return view


def prefix(view: Path) -> list[str]:
    """The argv prefix that runs a command (after `ip netns exec NS`) on the stock image."""
    return ["sh", str(HERE / "enter.sh"), str(view)]


def stock_file(view: Path, name: str) -> Path:
    """The pretend package manager's control files: mirror, hold, calls."""
    return view / "sbin" / ".stock" / name


def installed(view: Path, command: str) -> bool:
    return (view / "sbin" / command).exists() or (view / "sbin" / command).is_symlink()
