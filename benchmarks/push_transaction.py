"""What one change of rules costs on a host, three ways of making it one transaction (or not), by set size.

`python -m benchmarks.push_transaction [SIZES]` (root; prints a table, writes nothing). In a fresh network
namespace per size, a host with one ENCLAVE-INPUT rule matching a hash:ip set of N members (IPv4 and IPv6
tables), changed to N other members and one changed rule, each way repeated and the median printed:

  swap in place   the previous design: stage a `.new` twin, `ipset swap` it in, then iptables-restore and
                  ip6tables-restore. Between the swap and the restores, new members live under old rules.
  generation      enclave's design: create the set under a new name (a hash of its members), switch each
                  family's rules to it in one iptables-restore, destroy the old set. Never a mix.
  nft, one file   the whole table (set and rules) replaced by one `nft -f` transaction: what an nft-native
                  enclave would do (its rules are iptables files today; given for comparison, needs nft).
  proof           what the push adds before any of them: the same files applied in a scratch network
                  namespace (`unshare --net`), where the kernel judges every rule (`--test` misses targets).

The machine is shared: figures are medians and move from run to run.
"""

from __future__ import annotations

import ipaddress
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SIZES = (10, 1_000, 10_000)
ROUNDS = 5


def members(n: int, offset: int) -> list[str]:
    base = int(ipaddress.IPv4Address("10.0.0.0")) + offset
    return [str(ipaddress.IPv4Address(base + i)) for i in range(n)]


def table(family: int, set_name: str, port: int) -> str:
    rule = (f"-A ENCLAVE-INPUT -p tcp -m tcp --dport {port} -m set --match-set {set_name} src -j ACCEPT\n"
            if family == 4 else "")
    return ("*filter\n:INPUT DROP [0:0]\n:ENCLAVE-INPUT - [0:0]\n-A ENCLAVE-INPUT -i lo -j ACCEPT\n"
            + rule + "-A ENCLAVE-INPUT -j DROP\nCOMMIT\n")


def ipset_file(name: str, addresses: list[str]) -> str:
    hashsize = max(1024, 1 << (len(addresses) - 1).bit_length())
    return f"create {name} hash:ip family inet hashsize {hashsize}\n" + "".join(f"add {name} {a}\n" for a in addresses)


def nft_file(addresses: list[str], port: int) -> str:
    elements = ", ".join(addresses)
    return (f"table inet enclave\ndelete table inet enclave\ntable inet enclave {{\n"
            f"  set peers {{ type ipv4_addr; elements = {{ {elements} }} }}\n"
            f"  chain input {{ type filter hook input priority 0; policy drop; iif lo accept;"
            f" tcp dport {port} ip saddr @peers accept; }}\n}}\n")


def run(ns: str, script: str) -> float:
    start = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-e", "-c", script], check=True, capture_output=True)
    return time.perf_counter() - start


def measure(n: int, work: Path) -> dict[str, float]:
    ns = f"enc-bench-tx-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        old, new = members(n, 0), members(n, n)
        files = {
            "old.ipset": ipset_file("enclave-peers.old", old), "new.ipset": ipset_file("enclave-peers.gen", new),
            "twin.ipset": ipset_file("enclave-peers.new", new), "live.ipset": ipset_file("enclave-peers", old),
            "old.v4": table(4, "enclave-peers.old", 80), "new.v4": table(4, "enclave-peers.gen", 81),
            "live.v4": table(4, "enclave-peers", 80), "live2.v4": table(4, "enclave-peers", 81),
            "v6": table(6, "", 0), "old.nft": nft_file(old, 80), "new.nft": nft_file(new, 81),
        }
        for name, text in files.items():
            (work / name).write_text(text)
        w = str(work)
        samples: dict[str, list[float]] = {"swap in place": [], "generation": [], "proof": []}
        has_nft = shutil.which("nft") is not None
        if has_nft:
            samples["nft, one file"] = []
        for _ in range(ROUNDS):
            # swap in place, from the old state
            run(ns, f"iptables -F; iptables -X; ipset destroy; ipset restore < {w}/live.ipset; iptables-restore --noflush < {w}/live.v4")
            samples["swap in place"].append(run(ns, (
                f"ipset restore < {w}/twin.ipset; ipset swap enclave-peers.new enclave-peers; ipset destroy enclave-peers.new;"
                f" iptables-restore --noflush < {w}/live2.v4; ip6tables-restore --noflush < {w}/v6")))
            # generation, from the old state
            run(ns, f"iptables -F; iptables -X; ipset destroy; ipset restore < {w}/old.ipset; iptables-restore --noflush < {w}/old.v4")
            samples["generation"].append(run(ns, (
                f"ipset restore < {w}/new.ipset; iptables-restore --noflush < {w}/new.v4;"
                f" ip6tables-restore --noflush < {w}/v6; ipset destroy enclave-peers.old")))
            samples["proof"].append(run(ns, (
                f"unshare --net sh -c 'ipset restore < {w}/new.ipset && iptables-restore < {w}/new.v4"
                f" && ip6tables-restore < {w}/v6'")))
            if has_nft:
                run(ns, f"iptables -F; iptables -X; ipset destroy; nft -f {w}/old.nft")
                samples["nft, one file"].append(run(ns, f"nft -f {w}/new.nft"))
                run(ns, "nft delete table inet enclave")
        exec_overhead = statistics.median(run(ns, "true") for _ in range(ROUNDS))
        return {k: statistics.median(v) for k, v in samples.items()} | {"exec overhead": exec_overhead}
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main(argv: list[str]) -> int:
    sizes = tuple(int(x) for x in argv[0].split(",")) if argv else SIZES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            rows.append((n, measure(n, Path(tmp))))
    columns = list(rows[0][1])
    print("| members | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for n, figures in rows:
        print(f"| {n:,} | " + " | ".join(f"{figures[c] * 1000:.1f} ms" for c in columns) + " |")
    print("\n(medians of", ROUNDS, "rounds, each including one `ip netns exec` + `sh`: the exec overhead column;"
          " the machine was shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
