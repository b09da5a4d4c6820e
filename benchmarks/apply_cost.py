"""Apply cost: loading a host's whole ruleset at N peers, and adding one peer, against the seed's commands.

In a server namespace (`netns.py`), for the files `Renderer` makes for `server-1` of `fleet.peers_stack(N)`:
  - load: what makes the rules live, run in the namespace as one shell: `ipset restore` of the staged
    members, the swap, `iptables-restore --noflush` and `ip6tables-restore --noflush`;
  - apply.sh: the installed helper applying the same files (adds the `--test` passes and chain checks);
  - push: the whole push script from an empty host (writes the files and helper, validates, arms the
    rollback timer, applies);
  - add one peer: the push of the N+1-peer files onto the N-peer host (what `pulumi up` runs after one
    instance is added to a source role).
The seed form is timed as the tutorial does it: one `iptables -A` per peer, and adding a peer is one more.
Every figure includes one `ip netns exec` (a few ms, printed as "exec overhead").
"""

from __future__ import annotations

import time

from enclave.render import RuleFiles, staging_name

from .dataplane import CLIENT_IP, SERVER_IF, SERVER_IP, check_tools
from .fleet import VPC
from .netns import Pair, namespace_pair
from .report import Table, median, ms
from .rulesets import EMPTY_TABLE, Pusher, enclave_files, reset, seed_rules

SEED_SAMPLE = 500  # quick runs time this many `iptables -A` at each end and interpolate the rest


def _sh(pair: Pair, script: str) -> float:
    start = time.perf_counter()
    pair.in_server("sh", "-e", "-s", input=script, timeout=600)
    return time.perf_counter() - start


def load_script(files: RuleFiles) -> str:
    """The live part of an apply, as one shell: stage members, swap them in, restore both tables (whose
    `:ENCLAVE-INPUT - [0:0]` lines create enclave's chains on a host that has none yet)."""
    swaps = "".join(f"swap {staging_name(s)} {s}\ndestroy {staging_name(s)}\n" for s in files.set_names)
    return (
        "ipset -exist restore <<'EOF'\n" + files.ipsets + "EOF\n"
        + "ipset restore <<'EOF'\n" + swaps + "EOF\n"
        + "iptables-restore -w --noflush <<'EOF'\n" + files.ipv4 + "EOF\n"
        + "ip6tables-restore -w --noflush <<'EOF'\n" + files.ipv6 + "EOF\n"
    )


def _seed_commands(pair: Pair, ips: tuple[str, ...], quick: bool) -> tuple[float, bool]:
    """Seconds for one `iptables -A` per peer onto an empty INPUT; estimated from samples when quick."""
    rules = [f"iptables -w {rule}" for rule in seed_rules(ips)]
    reset(pair)
    if not quick or len(rules) <= 2 * SEED_SAMPLE:
        return _sh(pair, "\n".join(rules) + "\n"), False
    head = _sh(pair, "\n".join(rules[:SEED_SAMPLE]) + "\n") / SEED_SAMPLE
    reset(pair)
    table = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", *seed_rules(ips[: len(ips) - SEED_SAMPLE]), "COMMIT", ""])
    pair.in_server("iptables-restore", "-w", input=table)
    tail = _sh(pair, "\n".join(rules[-SEED_SAMPLE:]) + "\n") / SEED_SAMPLE
    return (head + tail) / 2 * len(rules), True  # the cost of one -A grows about linearly with the rules


def run(peer_counts: tuple[int, ...] = (1000, 10000), rounds: int = 5, quick: bool = False, echo: bool = True) -> list[Table]:
    check_tools("ipset", "iptables-restore")
    rows = []
    prefix = int(VPC.rsplit("/", 1)[1])
    with namespace_pair(CLIENT_IP, SERVER_IP, prefix, SERVER_IF) as pair:
        overhead = median([_sh(pair, "true\n") for _ in range(5)])
        for n in peer_counts:
            fleet = enclave_files(n, CLIENT_IP, SERVER_IP, SERVER_IF)
            grown = enclave_files(n + 1, CLIENT_IP, SERVER_IP, SERVER_IF)
            samples: dict[str, list[float]] = {"load": [], "apply.sh": [], "push": [], "add one peer": []}
            for _ in range(rounds):
                reset(pair)
                samples["load"].append(_sh(pair, load_script(fleet.files)))
                reset(pair)
                pusher = Pusher(pair)
                try:
                    samples["push"].append(pusher.push(fleet.files))
                    samples["apply.sh"].append(pusher.apply_dir())
                    samples["add one peer"].append(pusher.push(grown.files))
                finally:
                    pusher.close()
            seed_all, estimated = _seed_commands(pair, fleet.peer_ips, quick)
            seed_one = _sh(pair, "iptables -w -A INPUT -s 10.0.250.1/32 -j ACCEPT\n")  # onto the N rules
            reset(pair)
            start = time.perf_counter()
            pair.in_server("iptables-restore", "-w", input=EMPTY_TABLE.replace("COMMIT", "\n".join(seed_rules(fleet.peer_ips)) + "\nCOMMIT"))
            seed_restore = time.perf_counter() - start
            reset(pair)
            med = {k: median(v) for k, v in samples.items()}
            if echo:
                print(f"apply: {n:,} peers  load {ms(med['load'])}  push {ms(med['push'])}  "
                      f"seed one by one {ms(seed_all)}", flush=True)
            rows.append((n, med, seed_all, estimated, seed_one, seed_restore, len(fleet.files.set_names)))
    table = Table(
        "Apply cost: loading a host's rules, and adding one peer",
        f"Medians of {rounds} rounds in a network namespace; `ip netns exec` costs about {ms(overhead)} of each "
        "figure. *load* is what makes the rules live (`ipset restore`, swap, `iptables-restore` and "
        "`ip6tables-restore`, one shell); *apply.sh* is the installed helper, which also validates; *push* is the "
        "whole push script onto an empty host; *add one peer* re-pushes the host with one peer more. The seed "
        "form runs one `iptables -A` per peer.",
        ["peers", "enclave load", "enclave apply.sh", "enclave push", "enclave: add one peer",
         "seed: one `-A` per peer", "seed: add one peer", "seed rules by iptables-restore"],
    )
    for n, med, seed_all, estimated, seed_one, seed_restore, _sets in rows:
        table.rows.append([
            f"{n:,}", f"**{ms(med['load'])}**", ms(med["apply.sh"]), ms(med["push"]), ms(med["add one peer"]),
            ms(seed_all) + (" (est.)" if estimated else ""), ms(seed_one), ms(seed_restore),
        ])
    for n, med, seed_all, *_ in rows:
        table.notes.append(
            f"{n:,} peers: full load {ms(med['load'])} (target ≤ 100 ms: **{'met' if med['load'] <= 0.1 else 'MISSED'}**); "
            f"with validation (apply.sh) {ms(med['apply.sh'])}; the seed's commands {ms(seed_all)}."
        )
    if any(r[3] for r in rows):
        table.notes.append(
            f"(est.): a quick run times {SEED_SAMPLE} `iptables -A` on an empty chain and {SEED_SAMPLE} on a full "
            "one, and interpolates; a full run times every command."
        )
    return [table]
