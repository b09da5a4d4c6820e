"""What runs on a host: the push, the confirmation, the rollback, the boot restore and the first-boot baseline.

All of it is POSIX sh around one installed helper, `$STATE/apply.sh` (STATE defaults to /var/lib/enclave), so
the Pulumi program, the lab and a user reading `pulumi preview --diff` see the same text.

One change of rules is two SSH commands (the iptables-apply idea, automated):

  push     writes the new files to a private directory, proves them, arms a rollback timer, applies them and
           marks them pending. Exit 0 = applied and pending.
  confirm  runs over a NEW SSH connection (through the bastion): an open session survives a rule that blocks
           new ones, only a new connection proves access. It promotes exactly the applied pending rules to
           confirmed and disarms the timer. Without it, the timer restores the last confirmed rules.

Guarantees, and how each is kept (the fault-injection suite, tests/test_lab_faults.py, proves them):

1. Never open. Every path that cannot apply rules (boot, rollback, a failed push) falls back: the confirmed
   rules, else the baseline, else a built-in closed set (policies DROP; ENCLAVE-INPUT admits loopback, replies,
   ICMPv6 neighbour discovery and only the baseline's SSH accept lines, read by a strict pattern even from a
   damaged baseline file). A boot restore sets the INPUT and FORWARD policies to DROP before anything else, so
   even a restore killed half-way leaves the host closed. Nothing ever sets a policy to ACCEPT.
2. Files are trusted only once proven. Every rule directory is content-addressed ($STATE/rules/<digest>) and
   carries SHA256SUMS computed where the rules were rendered; a directory is used only if its sums hold. Files
   are written to a temporary name, fsynced, then renamed; `confirmed` and `baseline` are symlinks flipped by an
   atomic rename. Before a directory is applied (push, rollback or boot) it is applied for real in a scratch
   network namespace (`unshare --net`): the kernel itself judges every rule, set and target. `--test` is not
   enough: on the nf_tables backend `ip6tables-restore --test` accepts `-j NOSUCHTARGET`.
3. One change at a time, never a mix. Each set's name carries a generation: a short hash of its own contents
   (`enclave-wordpress.k3x`), and the rules reference those names. New sets are created beside the live ones,
   then each family's rules switch over in one iptables-restore transaction, then sets no rule references are
   destroyed. New members never live under old rules or the reverse, an unchanged set is never touched, and a
   rejected push only destroys the sets it created itself. Measured (benchmarks/push_transaction.py, 2 shared
   cores, medians): a change of a 10 / 1 000 / 10 000-member set and its rules costs 28 / 33 / 69 ms this way and
   28 / 40 / 68 ms swapping members into the live set (the previous design, which let them live under old
   rules); the scratch-namespace proof adds 23 / 39 / 67 ms. One `nft -f` transaction would be atomic too, but
   ipsets and iptables files are outside any nft transaction: it would mean an nft renderer. Both families are proven in the scratch namespace before either is
   applied; if one still fails live, the host goes back to its confirmed rules (both families).
4. One ordered state machine under a host lock (flock $STATE/lock): push, confirm, the rollback timer and the
   boot restore each hold it, so interleaved pushes serialise. `pending` (digest, token, staged|applied) is
   written before anything is applied and the timer is armed before the rules change, so whatever is in force
   unconfirmed always has a rollback armed. A confirm promotes exactly the directory its push applied (same
   digest, same token's rules, in force now), and only once that push finished ("applied"). The timer checks
   its own result and writes into `rolled-back` exactly what is in force afterwards; `in-force` always names
   the rules (or `closed`) in force.
5. Jump placement: a missing `-j ENCLAVE-INPUT` (or OUTPUT) is inserted just after the last rule of INPUT
   (OUTPUT) that jumps to another tool's chain (fail2ban's f2b-*, Docker's, ufw's), else first; an existing jump
   is left where it is. fail2ban inserts its jumps first when it starts (after enclave's boot restore), so ban
   chains are consulted before enclave's accepts both in a real boot order and after a jump was flushed by hand.
6. Every failure message names the host, the rules' digest and the cause.
7. The one case that needs a console: the confirmed rules and every SSH line of the baseline damaged (the closed
   rules then admit no SSH), or the rollback timer itself killed (the next push or boot converges).

Reboots: a systemd unit (enclave-firewall.service, before the network comes up, with ENCLAVE_STATE_DIR set to the
push's state directory) and cloud-init's bootcmd both run `apply.sh restore`. The unit checks apply.sh's own
checksum first and closes the host (policies DROP) if it cannot run it. A push still pending when the host
restarts is void: a late confirm then fails instead of promoting rules that were never proven.

The test hook: `checkpoint NAME` in these scripts is a no-op unless ENCLAVE_TEST_KILL_AT names that step; then
the script (and the push or confirm that called it) dies there as under kill -9. Only the fault-injection tests
set it.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shlex


from config.names import SET_PREFIX

from .rulefiles import CHAIN_PREFIX, RuleFiles

HEREDOC = "ENCLAVE_EOF"
STATE_DIR_DEFAULT = "/var/lib/enclave"
ROLLBACK_SECONDS_DEFAULT = 90
INSTALL_WAIT_DEFAULT = 600  # a first boot's apt-get (unattended-upgrades may hold dpkg's lock for minutes)
UNIT_NAME = "enclave-firewall.service"
STATE = f'STATE="${{ENCLAVE_STATE_DIR:-{STATE_DIR_DEFAULT}}}"'
SSHD_DROP_IN = "enclave.conf"
# Bastions take every operator's and every push's connection on port 22, which only operators may reach; sshd's
# default (10:30:100) starts refusing unauthenticated connections at 10, and pulumi up opens one per host at once.
BASTION_MAX_STARTUPS = "100:30:1000"
# The files of one rule directory, in the order SHA256SUMS lists them.
RULE_DIR_FILES = ("digest", "host", "ipsets", "rules.v4", "rules.v6", "sets")
GENERATION_CHARS = 3  # a set name is at most 27 characters + "." + 3 = 31, ipset's limit
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=64)
def digest(files: RuleFiles) -> str:
    """Identifies a host's rules: equal digests, equal rules (the push re-runs exactly when it changes)."""
    h = hashlib.sha256()
    for part in (files.ipv4, files.ipv6, files.ipsets):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _heredoc(path: str, text: str) -> str:
    # The substring test first: it is C-fast, and a line equal to the delimiter contains it (a Python loop over
    # every line cost 3.9 s of 4.2 s when planning 5 000 prod-shaped hosts).
    if HEREDOC in text and HEREDOC in text.splitlines():
        raise ValueError(f"rule text contains the here-document delimiter {HEREDOC}")
    return f"cat > {path} <<'{HEREDOC}'\n{text}{HEREDOC}\n"


def _generation(definition: str, members: list[str]) -> str:
    h = int.from_bytes(hashlib.sha256("\n".join([definition, *sorted(members)]).encode()).digest()[:8], "big")
    chars = []
    for _ in range(GENERATION_CHARS):
        h, r = divmod(h, 36)
        chars.append(_BASE36[r])
    return "".join(chars)


_MATCH_SET = re.compile(r"(--match-set )(\S+)( )")


def host_files(files: RuleFiles) -> dict[str, str]:
    """The rule directory as it lands on the host: sets renamed to their generation (a hash of their contents),
    the rules referencing those names, and the ipset file reduced to `create`/`add` lines of those names.

    render.py stages members in `<set>.new` twins; here each twin becomes `<set>.<generation>`. A line this does
    not understand is kept as is (on the host, the kernel then judges it, and a bad one rejects the push)."""
    names: dict[str, str] = {}
    ipsets = []
    # render.py writes one block per set, each starting with its "# about" line, and shares the block's text
    # between hosts: transformed once per distinct block (5 000 hosts of thousand-member sets stay cheap).
    # str.split: a regex split cost 0.36 ms per prod host at 2 000 hosts. Every block but the first then starts
    # with the rest of its "# about" line.
    for i, block in enumerate(files.ipsets.split("\n# ")):
        block_names, text = _set_block(block, i > 0)
        names.update(block_names)
        ipsets.append(text)

    def rename(text: str) -> str:
        return _MATCH_SET.sub(lambda m: m.group(1) + names.get(m.group(2), m.group(2)) + m.group(3), text)

    out = {
        "digest": digest(files) + "\n",
        "host": files.host + "\n",
        "ipsets": "".join(ipsets),
        "rules.v4": rename(files.ipv4),
        "rules.v6": rename(files.ipv6),
        "sets": "".join(f"{n}\n" for n in names.values()),
    }
    sums = "".join(f"{hashlib.sha256(out[name].encode()).hexdigest()}  {name}\n" for name in RULE_DIR_FILES)
    return {**out, "SHA256SUMS": sums}


@functools.lru_cache(maxsize=4096)
def _set_block(block: str, starts_in_a_comment: bool) -> tuple[dict[str, str], str]:
    definitions: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    other: list[str] = []
    for line in block.splitlines()[1 if starts_in_a_comment else 0:]:
        words = line.split()
        if not words or line.startswith("#"):
            continue
        if words[0] == "create" and len(words) > 1 and words[1].endswith(".new"):
            base = words[1][: -len(".new")]
            definitions[base] = " ".join(w for w in words[2:] if w != "-exist")
            members.setdefault(base, [])
        elif words[0] == "add" and len(words) > 2 and words[1].endswith(".new"):
            members.setdefault(words[1][: -len(".new")], []).append(" ".join(words[2:]))
        elif words[0] in ("create", "flush") and len(words) > 1:
            continue  # the live set and the twin's flush: the generation replaces both
        else:
            other.append(line)
    names = {base: f"{base}.{_generation(definitions.get(base, ''), m)}" for base, m in members.items()}
    lines = []
    for base, name in names.items():
        lines.append(f"create {name} {definitions.get(base, '')}".rstrip())
        lines += [f"add {name} {m}" for m in members[base]]
    return names, "".join(f"{line}\n" for line in lines + other)


# The helper installed on every host. A rule directory holds RULE_DIR_FILES and SHA256SUMS.
APPLY_SH = rf"""#!/bin/sh
# enclave apply.sh: the one routine behind push, confirm, rollback and boot. Generated by enclave.
#   apply.sh push DIR WINDOW [BASELINE_DIR]  prove DIR, arm the rollback, apply it, mark it pending
#   apply.sh confirm DIGEST                  promote the applied pending DIGEST to confirmed
#   apply.sh rollback TOKEN WINDOW           (the timer) restore the confirmed rules unless TOKEN was confirmed
#   apply.sh restore (or --restore)          boot: close, void a pending push, restore confirmed/baseline/closed
#   apply.sh baseline DIR                    install DIR as the baseline (first boot)
#   apply.sh install [WAIT]                  add the packages a stock image lacks (cloud-init runcmd, every push)
#   apply.sh DIR                             prove and apply a rule directory by hand
set -u
umask 077
{STATE}
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
ME="enclave"
why=""; now=""
say() {{ echo "$ME $*" >&2; }}
# The commands this program runs, each with the Debian/Ubuntu package that ships it. No stock image has ipset;
# Debian's has no iptables either (Priority optional): `apply.sh install` adds those two.
TOOLS="iptables-restore:iptables ip6tables-restore:iptables iptables:iptables ip6tables:iptables ipset:ipset
unshare:util-linux flock:util-linux setsid:util-linux sha256sum:coreutils awk:mawk cmp:diffutils getent:libc-bin"
# missing_tools: one "COMMAND (package PACKAGE)" line per command not found.
missing_tools() {{
  for tp in $TOOLS; do
    command -v "${{tp%%:*}}" >/dev/null 2>&1 || echo "${{tp%%:*}} (package ${{tp#*:}})"
  done
}}
# Test hook (tests/test_lab_faults.py): a no-op unless ENCLAVE_TEST_KILL_AT names this step; then, once (the
# marker directory), this script and the push/confirm that started it die here as under kill -9.
checkpoint() {{
  if [ "${{ENCLAVE_TEST_KILL_AT:-}}" = "$1" ] && mkdir "$STATE/test-killed-at-$1" 2>/dev/null; then
    kill -9 ${{ENCLAVE_TOP_PID:-}} $$
  fi
}}

# write_file PATH TEXT: temporary file, fsync, rename, fsync the directory.
write_file() {{
  printf '%s\n' "$2" > "$1.tmp.$$" && sync "$1.tmp.$$" && mv -f "$1.tmp.$$" "$1" && sync "$(dirname "$1")" && return 0
  rm -f "$1.tmp.$$"; return 1
}}
# flip LINK TARGET: point a symlink at TARGET with one rename (never a moment without it).
flip() {{
  if [ -d "$1" ] && [ ! -L "$1" ]; then rm -rf "$1.legacy" && mv "$1" "$1.legacy" || return 1; fi
  ln -sfn "$2" "$1.lnk.$$" && mv -fT "$1.lnk.$$" "$1" && sync "$STATE" && {{ rm -rf "$1.legacy"; return 0; }}
  rm -f "$1.lnk.$$"; return 1
}}
# intact DIR: every file present and as SHA256SUMS says (written where the rules were rendered).
intact() {{
  [ -f "$1/SHA256SUMS" ] || return 1
  [ "$(awk '{{print $2}}' "$1/SHA256SUMS" | tr '\n' ' ')" = "{' '.join(RULE_DIR_FILES)} " ] || return 1
  (cd "$1" && sha256sum -c --status SHA256SUMS) 2>/dev/null
}}
about() {{ echo "$(cat "$1/host" 2>/dev/null || echo '?'): rules $(cat "$1/digest" 2>/dev/null || echo '?')"; }}

# prove DIR: apply it for real in a scratch network namespace: the kernel judges every set, rule and target
# (iptables-restore --test on nf_tables accepts an unknown target). Prints the kernel's complaint on failure.
prove() {{
  unshare --net sh -c '
    [ ! -s "$1/ipsets" ] || ipset restore < "$1/ipsets" 2>&1 || {{ echo "ipset definitions rejected"; exit 1; }}
    iptables-restore < "$1/rules.v4" 2>&1 || {{ echo "IPv4 rules rejected"; exit 1; }}
    ip6tables-restore < "$1/rules.v6" 2>&1 || {{ echo "IPv6 rules rejected"; exit 1; }}' prove "$1" 2>&1
}}

# jumps: make INPUT/OUTPUT jump to enclave's chains. A missing jump goes right after the last rule that jumps to
# another tool's chain (fail2ban's f2b-*, Docker, ufw), else first, so ban chains are consulted before enclave's
# accepts; an existing jump stays where it is. An empty enclave chain returns, so this changes no verdict.
# jump_at TABLE CHAIN: where a missing jump to enclave's chain goes (printed), or nothing when it is there: just
# after the last rule that jumps to another tool's chain (fail2ban's f2b-*, Docker's, ufw's), else first, so ban
# chains are consulted before enclave's accepts.
jump_at() {{
  $1 -w -C $2 -j {CHAIN_PREFIX}-$2 2>/dev/null && return 0
  $1 -w -S | awk -v c=$2 '$1 == "-N" {{ user[$2] = 1 }}
    $1 == "-A" && $2 == c {{ n++; for (i = 3; i < NF; i++) if ($i == "-j" && ($(i+1) in user) && $(i+1) !~ /^{CHAIN_PREFIX}-/) last = n }}
    END {{ print last + 1 }}'
}}
jumps() {{
  for t in iptables ip6tables; do
    for c in INPUT OUTPUT; do
      $t -w -n -L {CHAIN_PREFIX}-$c >/dev/null 2>&1 || $t -w -N {CHAIN_PREFIX}-$c || return 1
      at=$(jump_at $t $c)
      [ -z "$at" ] || $t -w -I $c "$at" -j {CHAIN_PREFIX}-$c || return 1
    done
  done
}}

# stage DIR: create DIR's sets that do not exist yet (their names are their contents' hash, so an existing one
# already holds these members; one changed by hand is refilled through a swap). Lists created sets in $created.
created=""
stage() {{
  for s in $(cat "$1/sets"); do
    if ipset list -n "$s" >/dev/null 2>&1; then
      tmp="{SET_PREFIX}refill-$$"
      ipset destroy "$tmp" 2>/dev/null
      awk -v s="$s" -v t="$tmp" '$2 == s {{ $2 = t; print }}' "$1/ipsets" | ipset restore || return 1
      want=$(ipset save "$tmp" | awk '$1 == "add" {{ print $3 }}' | sort)
      have=$(ipset save "$s" | awk '$1 == "add" {{ print $3 }}' | sort)
      if [ "$want" = "$have" ]; then ipset destroy "$tmp"; continue; fi
      ipset swap "$tmp" "$s" && ipset destroy "$tmp" || return 1
    else
      awk -v s="$s" '$2 == s' "$1/ipsets" | ipset restore || {{ created="$created $s"; return 1; }}
      created="$created $s"
    fi
  done
}}
unstage() {{ for s in $created; do ipset destroy "$s" 2>/dev/null; done; created=""; return 0; }}
# sweep: destroy enclave's sets that no rule references any more (the kernel refuses to destroy a referenced one).
sweep() {{
  command -v ipset >/dev/null 2>&1 || return 0
  for s in $(ipset list -n | grep '^{SET_PREFIX}'); do
    grep -qx "$s" "$1/sets" 2>/dev/null || ipset destroy "$s" 2>/dev/null
  done
  return 0
}}

# apply DIR: sets beside the live ones, then each family in one transaction, then the unreferenced sets go.
# Sets $why on failure (no command substitution around it: the test hook must kill this very process).
apply() {{
  jumps || {{ why="could not place the jumps to enclave's chains"; return 1; }}
  stage "$1" || {{ unstage; why="could not create the sets $(cat "$1/sets" | tr '\n' ' ')"; return 1; }}
  checkpoint apply:sets
  rm -f "$STATE/in-force"  # from here until it is written again, "unknown" rather than wrong
  out=$(iptables-restore -w --noflush < "$1/rules.v4" 2>&1) || {{ unstage; why="IPv4 rules failed to apply: $out"; return 1; }}
  checkpoint apply:v4
  out=$(ip6tables-restore -w --noflush < "$1/rules.v6" 2>&1) || {{ why="IPv6 rules failed to apply: $out"; return 1; }}
  checkpoint apply:v6
  created=""
  open_nft
  write_file "$STATE/in-force" "$(cat "$1/digest")" || echo "enclave $(about "$1"): in force, but $STATE/in-force could not be written" >&2
  sweep "$1"
}}

# closed: the built-in last resort. Policies DROP; ENCLAVE-INPUT admits loopback, replies, neighbour solicitations
# and advertisements (IPv6 cannot resolve its neighbours without them; never router advertisements, which would
# let any neighbour become the gateway) and the baseline's SSH accept lines (by a strict pattern, so a damaged
# baseline still yields them; none: console). One iptables-restore per family sets the policies, fills the chains
# and adds a missing jump together: no moment where the policy drops what the chain would admit (loopback at boot).
# Where iptables cannot do it (a Debian image without the package), the same rules go into an nftables table
# (nft is on every stock image); where neither can, the host is OPEN and says so: $closed_state, then in-force.
ssh_re='^-A {CHAIN_PREFIX}-INPUT( -i [A-Za-z0-9_.@-]+)?( -s [0-9A-Fa-f.:/]+)?( -i [A-Za-z0-9_.@-]+)? -p tcp -m tcp --dport 22( -m comment --comment "[^"]*")? -j ACCEPT$'
closed_state=""
closed_rules() {{
  unclosed=""
  for f in 4 6; do
    t=iptables; [ $f = 6 ] && t=ip6tables
    nd=""
    [ $f = 6 ] && for x in 135 136; do nd="$nd
-A {CHAIN_PREFIX}-INPUT -p ipv6-icmp -m icmp6 --icmpv6-type $x -m hl --hl-eq 255 -j ACCEPT"; done
    ssh=$(cat "$STATE/baseline/rules.v$f" 2>/dev/null | grep -E "$ssh_re")
    jump=""
    for c in INPUT OUTPUT; do
      at=$(jump_at $t $c 2>/dev/null)
      [ -z "$at" ] || jump="$jump
-I $c $at -j {CHAIN_PREFIX}-$c"
    done
    if printf '*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:{CHAIN_PREFIX}-INPUT - [0:0]\n:{CHAIN_PREFIX}-OUTPUT - [0:0]\n-A {CHAIN_PREFIX}-INPUT -i lo -j ACCEPT\n-A {CHAIN_PREFIX}-INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT%s\n%s\n-A {CHAIN_PREFIX}-INPUT -m comment --comment "enclave closed: nothing else to restore" -j DROP\n-A {CHAIN_PREFIX}-OUTPUT -o lo -j ACCEPT\n-A {CHAIN_PREFIX}-OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT%s\nCOMMIT\n' "$nd" "$ssh" "$jump" \
        | grep -v '^$' | $t-restore -w --noflush 2>/dev/null; then
      :
    elif $t -w -P INPUT DROP 2>/dev/null && $t -w -P FORWARD DROP 2>/dev/null; then
      say "the closed rules failed to apply for IPv$f; its INPUT and FORWARD policies are DROP (no SSH gets in)"
    else
      unclosed="$unclosed IPv$f"
    fi
  done
  if [ -z "$unclosed" ]; then open_nft; closed_state="closed"; return 0; fi
  if closed_nft; then
    say "$t-restore is missing or failed ($(missing_tools | tr '\n' ' ')): the closed rules are in the nftables table inet enclave_closed"
    closed_state="closed"; return 0
  fi
  closed_state="OPEN: nothing could close this host for$unclosed (neither iptables nor nft worked; missing: $(missing_tools | tr '\n' ' ')); install the package iptables (apt-get install iptables ipset), then run sh $STATE/apply.sh restore"
  echo "$ME: THE HOST IS OPEN. $closed_state" >&2
  return 1
}}
# closed_nft: the closed rules as one nftables transaction (a base chain at priority -1, before iptables-nft's:
# a drop there is final, an accept still meets iptables' rules). The baseline's SSH lines are translated.
closed_nft() {{
  command -v nft >/dev/null 2>&1 || return 1
  ssh_nft=""
  for f in 4 6; do
    fam=ip; [ $f = 6 ] && fam=ip6
    ssh_nft="$ssh_nft$(cat "$STATE/baseline/rules.v$f" 2>/dev/null | grep -E "$ssh_re" | awk -v fam=$fam '{{
      r = ""
      for (i = 1; i < NF; i++) {{ if ($i == "-i") r = r " iifname \"" $(i+1) "\""; if ($i == "-s") r = r " " fam " saddr " $(i+1) }}
      if (r !~ /saddr/) r = r " meta nfproto " (fam == "ip" ? "ipv4" : "ipv6")
      print "  " r " tcp dport 22 accept"
    }}')
"
  done
  printf 'table inet enclave_closed\ndelete table inet enclave_closed\ntable inet enclave_closed {{\n chain input {{\n  type filter hook input priority -1; policy drop;\n  iif "lo" accept\n  ct state established,related accept\n  icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} ip6 hoplimit 255 accept\n%s }}\n chain forward {{\n  type filter hook forward priority -1; policy drop;\n }}\n}}\n' "$ssh_nft" \
    | grep -v '^ *$' | nft -f - 2>/dev/null
}}
# open_nft: remove the nftables closed table once iptables holds the rules (it would drop what they admit).
open_nft() {{
  if command -v nft >/dev/null 2>&1; then nft delete table inet enclave_closed 2>/dev/null; fi
  return 0
}}
closed() {{
  rm -f "$STATE/in-force"
  closed_rules
  jumps 2>/dev/null
  write_file "$STATE/in-force" "$closed_state" || true
}}

# restore_chain: the confirmed rules, else the baseline, else closed. Sets $now to what is in force afterwards.
restore_chain() {{
  # (sh has no local variables: these names are used nowhere else)
  for slot in confirmed baseline; do
    slot_dir="$STATE/$slot"
    [ -e "$slot_dir" ] || continue
    if ! intact "$slot_dir"; then echo "enclave restore: $slot rules $(about "$slot_dir") are damaged (SHA256SUMS do not hold); skipped" >&2; continue; fi
    if ! why=$(prove "$slot_dir"); then echo "enclave restore: $slot rules $(about "$slot_dir") rejected by the kernel: $why; skipped" >&2; continue; fi
    if apply "$slot_dir"; then now="$slot rules $(cat "$slot_dir/digest")"; return 0; fi
    echo "enclave restore: $slot rules $(about "$slot_dir") failed to apply: $why" >&2
  done
  closed
  now="the built-in closed rules (SSH only as the baseline allows)"
  [ "$closed_state" = closed ] || now="NOTHING: $closed_state"
  return 2
}}

# store DIR: DIR (just proven) becomes $STATE/rules/<digest>, unless that holds exactly these files already.
store() {{
  stored="$STATE/rules/$(cat "$1/digest")"
  if intact "$stored" && cmp -s "$1/SHA256SUMS" "$stored/SHA256SUMS"; then return 0; fi
  rm -rf "$stored.old" && {{ [ ! -e "$stored" ] || mv -T "$stored" "$stored.old"; }} && mv -T "$1" "$stored" && sync "$STATE/rules" && rm -rf "$stored.old"
}}
lock() {{ exec 9>>"$STATE/lock" && flock 9; }}
pending_field() {{ awk -v n="$1" 'NR == 1 {{ print $n }}' "$STATE/pending" 2>/dev/null; }}

cmd=${{1:-}}
[ $# -gt 0 ] && shift
case "$cmd" in
restore|--restore)
  # Closed first (one transaction per family): whatever happens next, even kill -9, leaves the policies on DROP.
  closed_rules
  mkdir -p "$STATE" && lock
  # Restoring (a reboot) voids a push still pending: a late confirm must not promote rules no longer in force.
  if [ -e "$STATE/pending" ]; then
    write_file "$STATE/rolled-back" "rules $(pending_field 1) were dropped unconfirmed when the host restarted on its confirmed rules" || true
    rm -f "$STATE/pending"
  fi
  # then the built-in closed rules (loopback, replies, the baseline's SSH): killed from here on, the host is
  # closed and still reachable as its baseline says
  closed
  checkpoint restore:closed
  restore_chain; rc=$?
  checkpoint restore:done
  [ $rc = 0 ] || echo "enclave restore in $STATE: no confirmed or baseline rules could be applied; in force: $now" >&2
  exit $rc
  ;;
baseline)
  dir=$1; d=$(cat "$dir/digest" 2>/dev/null)
  mkdir -p "$STATE/rules" && lock
  intact "$dir" || {{ echo "enclave baseline $d: damaged in transit; not installed" >&2; exit 1; }}
  store "$dir" || {{ echo "enclave baseline $d: could not be stored in $STATE (disk full?)" >&2; exit 1; }}
  flip "$STATE/baseline" "rules/$d"
  ;;
install)
  # What a stock image lacks (ipset everywhere, iptables on Debian), from the image's package manager: run by
  # cloud-init's runcmd on the first boot (final stage: the network and apt's sources are configured by then)
  # and by every push before it changes anything. Installs serialise on their own lock, so a push that arrives
  # while cloud-init is installing waits for it (at most WAIT seconds) instead of failing.
  wait_s=${{1:-600}}; ME="enclave install ${{ENCLAVE_HOST:-$(hostname)}}:"
  mkdir -p "$STATE" || exit 1
  exec 8>>"$STATE/install.lock"
  flock -w "$wait_s" 8 || {{ say "another install held $STATE/install.lock for $wait_s s; nothing was changed"; exit 1; }}
  pkgs=$(missing_tools | sed -n 's/.*(package \(iptables\|ipset\))$/\1/p' | sort -u | tr '\n' ' ')
  installed=""
  if [ -n "$pkgs" ] && command -v apt-get >/dev/null 2>&1; then
    tries=0; since=$(date +%s)
    # A first boot's unattended-upgrades (and cloud-init's own apt) hold apt's locks for minutes: dpkg's lock is
    # waited for with DPkg::Lock::Timeout (apt >= 1.9.11), the lists' lock of `update` is not, so a failure that
    # names a lock is retried for up to WAIT seconds; any other (no mirror) at most three times.
    until apt_log=$(DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout="$wait_s" -o Acquire::Retries=2 update 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout="$wait_s" install --no-install-recommends $pkgs 2>&1); do
      tries=$((tries + 1))
      case "$apt_log" in
        *lock*) [ $(($(date +%s) - since)) -lt "$wait_s" ] || break ;;
        *) [ $tries -lt 3 ] || break ;;
      esac
      sleep 5
    done
    printf '%s\n' "$apt_log" > "$STATE/install.log"
    installed=$pkgs
  fi
  # The kernel side: ip_set and xt_set are modules of the stock kernels (Ubuntu's linux-modules, Debian's
  # cloud kernel); should a kernel lack them, Ubuntu's linux-modules-extra-<release> has them. A set and a rule
  # matching it, in a scratch namespace, prove them once something was installed.
  if [ -n "$installed" ] && command -v ipset >/dev/null 2>&1 && command -v iptables >/dev/null 2>&1 \
      && ! unshare --net sh -c 'ipset create enclave-probe hash:net && iptables -w -A INPUT -m set --match-set enclave-probe src -j ACCEPT' >/dev/null 2>&1; then
    extra="linux-modules-extra-$(uname -r)"
    if command -v apt-get >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout="$wait_s" install --no-install-recommends "$extra" >> "$STATE/install.log" 2>&1 \
        && unshare --net sh -c 'ipset create enclave-probe hash:net && iptables -w -A INPUT -m set --match-set enclave-probe src -j ACCEPT' >/dev/null 2>&1; then
      installed="$installed $extra"
    else
      say "the kernel $(uname -r) cannot match ipsets (modules ip_set, xt_set; on Ubuntu the package $extra): use an image whose kernel has them"
      exit 1
    fi
  fi
  missing=$(missing_tools)
  if [ -n "$missing" ]; then
    say "missing on this host, and $(command -v apt-get >/dev/null 2>&1 && echo "apt-get could not install them (see $STATE/install.log; is a package mirror reachable, or enclave:aptProxy set?)" || echo "no apt-get to install them with"):"
    printf '%s\n' "$missing" | sed "s|^|$ME   |" >&2
    exit 1
  fi
  # Now that the tools exist, a host that fell back to the closed rules for want of them gets its rules: the
  # confirmed ones, else the baseline (never while a push is pending: that push decides what is in force).
  if [ -n "$installed" ]; then
    mkdir -p "$STATE/rules" && lock
    case "$(cat "$STATE/in-force" 2>/dev/null)" in
      closed|OPEN*|"") [ -e "$STATE/pending" ] || {{ restore_chain; echo "$ME installed$installed; in force: $now" >&2; }} ;;
    esac
  fi
  ;;
push)
  dir=$1; window=$2; base=${{3:-}}
  d=$(cat "$dir/digest" 2>/dev/null); ME="enclave push $(cat "$dir/host" 2>/dev/null): rules $d"
  mkdir -p "$STATE/rules" && lock
  checkpoint push:locked
  intact "$dir" || {{ say "files damaged in transit (SHA256SUMS do not hold); nothing was changed"; exit 1; }}
  why=$(prove "$dir") || {{ say "rejected; nothing was changed: $why"; exit 1; }}
  if [ -n "$base" ]; then
    intact "$base" && why=$(prove "$base") || {{ say "the baseline $(cat "$base/digest") was rejected; nothing was changed: $why"; exit 1; }}
  fi
  checkpoint push:proven
  store "$dir" || {{ say "could not store the rules in $STATE/rules (disk full?); nothing was changed"; exit 1; }}
  if [ -n "$base" ]; then
    b=$(cat "$base/digest")
    store "$base" && flip "$STATE/baseline" "rules/$b" \
      || {{ say "could not store the baseline in $STATE (disk full?); nothing was changed"; exit 1; }}
  fi
  # The timer armed, then "pending" written, both before the rules change: whatever is in force unconfirmed
  # always has a rollback armed, and a pending record never outlives its timer. The token tells this push from
  # an earlier push of the same rules (the timer acts only if "pending" still holds its token).
  token="$d.$(date +%s).$$"
  # the timer neither holds this lock (fd 9) nor may the test hook take it for the push it outlives
  ENCLAVE_TOP_PID="" setsid sh "$STATE/apply.sh" rollback "$token" "$window" enclave-rollback </dev/null >/dev/null 2>&1 9>&- &
  checkpoint push:armed
  write_file "$STATE/pending" "$d $token staged" || {{ say "could not record the pending push in $STATE (disk full?); nothing was changed"; exit 1; }}
  checkpoint push:staged
  if ! apply "$STATE/rules/$d"; then
    failed=$why
    restore_chain
    rm -f "$STATE/pending"
    why=$failed
    say "failed to apply: $why; the host went back to $now"; exit 1
  fi
  checkpoint push:applied
  write_file "$STATE/pending" "$d $token applied" || {{ say "applied, but could not mark it so in $STATE (disk full?); it rolls back in $window s"; exit 1; }}
  checkpoint push:pending
  rm -f "$STATE/rolled-back"
  echo "enclave push $(cat "$STATE/rules/$d/host"): applied rules $d; confirm within $window s over a new connection or they roll back"
  ;;
rollback)
  token=$1; window=$2
  sleep "$window"
  lock
  [ "$(pending_field 2)" = "$token" ] || exit 0
  d=$(pending_field 1)
  # a confirm that promoted these rules and was killed before it cleared "pending": they are proven, keep them
  if [ "$(readlink "$STATE/confirmed")" = "rules/$d" ] && [ "$(cat "$STATE/in-force" 2>/dev/null)" = "$d" ]; then
    rm -f "$STATE/pending"; exit 0
  fi
  checkpoint rollback:locked
  restore_chain; rc=$?
  write_file "$STATE/rolled-back" "rules $d were rolled back after $window s without confirmation; in force now: $now" || true
  rm -f "$STATE/pending"
  exit $rc
  ;;
confirm)
  d=$1; ME="enclave confirm ${{ENCLAVE_HOST:-host}}: rules $d"
  mkdir -p "$STATE" && lock
  checkpoint confirm:locked
  inforce=$(cat "$STATE/in-force" 2>/dev/null)
  if [ "$(pending_field 1)" = "$d" ] && [ "$(pending_field 3)" = applied ] && [ "$inforce" = "$d" ] && intact "$STATE/rules/$d"; then
    flip "$STATE/confirmed" "rules/$d" || {{ say "could not be promoted in $STATE (disk full?); still pending, a retry can confirm them"; exit 1; }}
    checkpoint confirm:promoted
    rm -f "$STATE/pending" "$STATE/rolled-back"
    sync "$STATE"
    # rule directories nothing points at any more
    keep=" $(readlink "$STATE/confirmed") $(readlink "$STATE/baseline") "
    for x in "$STATE"/rules/*; do case "$keep" in *" rules/${{x##*/}} "*) ;; *) rm -rf "$x" ;; esac; done
    echo "$ME confirmed over a new connection"
  elif [ "$(readlink "$STATE/confirmed")" = "rules/$d" ] && [ "$inforce" = "$d" ] && [ ! -e "$STATE/pending" ]; then
    echo "$ME already confirmed"
  else
    if [ -e "$STATE/pending" ] && [ "$(pending_field 1)" = "$d" ]; then
      why="the push did not finish applying them (it was interrupted); they roll back when their window ends"
    elif [ -e "$STATE/pending" ]; then
      why="a later push replaced them with rules $(pending_field 1)"
    elif [ -s "$STATE/rolled-back" ]; then
      why=$(cat "$STATE/rolled-back")
    else
      why="they are not pending here; in force: ${{inforce:-not recorded}} (confirmed: $(readlink "$STATE/confirmed" | sed 's|^rules/||'))"
    fi
    say "are not in force: $why"
    echo "The host is on its last confirmed rules. If the new rules cut SSH from the bastion, fix the stack and run pulumi up again." >&2
    exit 1
  fi
  ;;
*)
  if [ -d "$cmd" ]; then  # apply.sh DIR: prove and apply a rule directory by hand (pending left alone)
    ME="enclave apply $(about "$cmd")"
    mkdir -p "$STATE" && lock
    why=$(prove "$cmd") || {{ say "rejected; nothing was changed: $why"; exit 1; }}
    apply "$cmd" || {{ say "failed to apply: $why"; exit 1; }}
    exit 0
  fi
  echo "enclave: usage: apply.sh push|confirm|rollback|restore|baseline|install ..."; exit 2 ;;
esac
exit 0
"""

UNIT = f"""[Unit]
Description=enclave host firewall: restore the last confirmed rules before the network comes up
DefaultDependencies=no
Wants=network-pre.target
Before=network-pre.target shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=ENCLAVE_STATE_DIR={STATE_DIR_DEFAULT}
# apply.sh runs only if its own checksum holds; otherwise (or if it fails) the host stays closed: policies DROP.
# Without iptables (a stock Debian image before the first install), an nftables table drops instead.
ExecStart=/bin/sh -c 'cd "$$ENCLAVE_STATE_DIR" && sha256sum -c --status apply.sh.sha256 && sh ./apply.sh restore || {{ for t in iptables ip6tables; do $$t -w -P INPUT DROP && $$t -w -P FORWARD DROP || nft "add table inet enclave_closed; add chain inet enclave_closed input {{ type filter hook input priority -1; policy drop; }}; add rule inet enclave_closed input iif lo accept; add rule inet enclave_closed input ct state established,related accept"; done; exit 1; }}'

[Install]
WantedBy=multi-user.target
"""


def _write_dir(var: str, files: RuleFiles) -> str:
    """Shell writing a rule directory; run in a subshell, it exits non-zero at the first write that fails."""
    out = [f'mkdir -p "{var}" || exit 1\n']
    for name, text in host_files(files).items():
        cmd, _, body = _heredoc(f'"{var}/{name}"', text).partition("\n")
        out.append(f"{cmd} || exit 1\n{body}")
    return "".join(out)


_APPLY_SUM = hashlib.sha256(APPLY_SH.encode()).hexdigest()


def install_helpers() -> str:
    """Shell that (re)writes apply.sh and, on systemd hosts, the boot unit. Same text in push and cloud-init."""
    apply_sum = _APPLY_SUM
    return (
        'mkdir -p "$STATE" || exit 1\n'
        + _heredoc('"$STATE/apply.sh.tmp.$$"', APPLY_SH)
        + f'echo "{apply_sum}  apply.sh" > "$STATE/apply.sh.sha256.tmp.$$"\n'
        + 'sync "$STATE/apply.sh.tmp.$$" "$STATE/apply.sh.sha256.tmp.$$" 2>/dev/null\n'
        + '[ "$(sha256sum < "$STATE/apply.sh.tmp.$$" | cut -d" " -f1)" = '
        + f'"{apply_sum}" ] && mv -f "$STATE/apply.sh.tmp.$$" "$STATE/apply.sh" '
        + '&& mv -f "$STATE/apply.sh.sha256.tmp.$$" "$STATE/apply.sh.sha256" || '
        + '{ rm -f "$STATE/apply.sh.tmp.$$" "$STATE/apply.sh.sha256.tmp.$$"; '
        + 'echo "enclave: could not install $STATE/apply.sh (disk full?)" >&2; }\n'
        # ENCLAVE_SYSTEMD_DIR lets a test harness (the lab) receive the unit without a systemd of its own.
        + 'UNITS="${ENCLAVE_SYSTEMD_DIR:-/etc/systemd/system}"\n'
        + 'if [ -n "${ENCLAVE_SYSTEMD_DIR:-}" ] || [ -d /run/systemd/system ]; then\n'
        # the unit restores from this state directory, whatever it is
        + f'mkdir -p "$UNITS"\ncat > "$UNITS/{UNIT_NAME}.tmp.$$" <<{HEREDOC}\n'
        + UNIT.replace(f"ENCLAVE_STATE_DIR={STATE_DIR_DEFAULT}", "ENCLAVE_STATE_DIR=$STATE").replace("$$", "\\$\\$")
        + f'{HEREDOC}\nmv -f "$UNITS/{UNIT_NAME}.tmp.$$" "$UNITS/{UNIT_NAME}"\n'
        + f'[ -n "${{ENCLAVE_SYSTEMD_DIR:-}}" ] || {{ systemctl daemon-reload && systemctl enable {UNIT_NAME}; }} >/dev/null 2>&1 || true\n'
        + "fi\n"
    )


def _key_fields(key: str) -> tuple[str, str]:
    words = key.split()
    if "\n" in key.strip() or len(words) < 2 or not re.fullmatch(r"[A-Za-z0-9+/=]+", words[1]):
        raise ValueError(f"ssh_public_key: not one OpenSSH public key line ({key[:40]!r}…)")
    return words[0], words[1]


def _authorized_keys_file(ssh_user: str) -> str:
    """Shell: AKF = the user's authorized_keys (the session's own HOME when it is that user, as in the lab)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", ssh_user):
        raise ValueError(f"ssh_user: {ssh_user!r} is not a user name")
    return (
        f'if [ "$(id -un)" = {ssh_user} ] && [ -n "${{HOME:-}}" ]; then HOMEDIR=$HOME; '
        f"else HOMEDIR=$(getent passwd {ssh_user} | cut -d: -f6); fi\n"
        f'[ -n "$HOMEDIR" ] || {{ echo "$ME: user {ssh_user} does not exist" >&2; exit 1; }}\n'
        'AKF="$HOMEDIR/.ssh/authorized_keys"\n'
    )


def _authorize_key(ssh_user: str, key: str) -> str:
    """Shell: make sure `key` is authorized for `ssh_user` (appended atomically if missing; remembered in
    $STATE/authorized-keys as enclave's own line, so a later confirm may remove it and only it)."""
    kind, blob = _key_fields(key)
    line = " ".join(key.split())
    return (
        _authorized_keys_file(ssh_user)
        + f"KEYLINE={shlex.quote(line)}\n"
        + 'mkdir -p "$(dirname "$AKF")" && touch "$AKF" || { echo "$ME: cannot write $AKF" >&2; exit 1; }\n'
        + f"if ! grep -qF {shlex.quote(f'{kind} {blob}')} \"$AKF\"; then\n"
        + '  { cat "$AKF"; [ -z "$(tail -c1 "$AKF")" ] || echo; echo "$KEYLINE"; } > "$AKF.enclave.$$" && chmod 600 "$AKF.enclave.$$" \\\n'
        + f'    && chown {ssh_user}: "$AKF.enclave.$$" "$(dirname "$AKF")" 2>/dev/null; sync "$AKF.enclave.$$" \\\n'
        + '    && mv -f "$AKF.enclave.$$" "$AKF" || { rm -f "$AKF.enclave.$$"; echo "$ME: could not authorize the key in $AKF (disk full?); nothing was changed" >&2; exit 1; }\n'
        + '  { cat "$STATE/authorized-keys" 2>/dev/null; printf \'%s\\t%s\\n\' "$AKF" "$KEYLINE"; } > "$STATE/authorized-keys.tmp" && mv -f "$STATE/authorized-keys.tmp" "$STATE/authorized-keys"\n'
        + "fi\n"
    )


def _retire_keys(ssh_user: str, key: str) -> str:
    """Shell: remove every key enclave authorized before, other than `key` (the confirm logged in with it)."""
    kind, blob = _key_fields(key)
    return (
        _authorized_keys_file(ssh_user)
        + f"CURRENT={shlex.quote(f'{kind} {blob}')}\n"
        + 'if [ -s "$STATE/authorized-keys" ]; then\n'
        + '  : > "$STATE/authorized-keys.keep.$$"\n'
        + "  while IFS='\t' read -r file old; do\n"
        + '    case "$old" in *"$CURRENT"*) printf \'%s\\t%s\\n\' "$file" "$old" >> "$STATE/authorized-keys.keep.$$"; continue ;; esac\n'
        + '    [ -f "$file" ] || continue\n'
        + '    grep -vxF -- "$old" "$file" > "$file.enclave.$$"; chmod 600 "$file.enclave.$$"\n'
        + '    chown --reference="$file" "$file.enclave.$$" 2>/dev/null; sync "$file.enclave.$$" && mv -f "$file.enclave.$$" "$file" \\\n'
        + '      || { rm -f "$file.enclave.$$"; printf \'%s\\t%s\\n\' "$file" "$old" >> "$STATE/authorized-keys.keep.$$"; }\n'
        + '  done < "$STATE/authorized-keys"\n'
        + '  mv -f "$STATE/authorized-keys.keep.$$" "$STATE/authorized-keys"\n'
        + "fi\n"
    )


def _header(kind: str, stack_name: str, host: str, d: str) -> str:
    return (
        f"#!/bin/sh\n# enclave {kind}: stack {stack_name}, host {host}, rules {d}\nset -u\numask 077\n{STATE}\n"
        f'ME="enclave {kind} {host}: rules {d}"\n'
        "export ENCLAVE_TOP_PID=$$  # for the test hook (checkpoint in apply.sh) only\n"
    )


def push_script(
    files: RuleFiles,
    stack_name: str,
    *,
    baseline: RuleFiles | None = None,
    ssh_user: str = "root",
    ssh_public_key: str | None = None,
    install_wait_s: int = INSTALL_WAIT_DEFAULT,
) -> str:
    """Prove, arm the rollback, apply. Fed to `sh -s` as root on the host; re-run exactly when rules change.

    baseline: the role's baseline, refreshed in $STATE/baseline (so a recovery uses the current operators).
    ssh_public_key: made sure to be authorized for ssh_user (appended if missing, never replacing a line).
    install_wait_s: how long the push may wait for the packages a stock image lacks (its own install, or the
    first boot's still running); then a missing command fails the push, one line each, before anything changes.
    """
    d = digest(files)
    new, base = '"$STATE/incoming.$$"', '"$STATE/baseline-in.$$"'
    write = _write_dir("$STATE/incoming.$$", files) + (_write_dir("$STATE/baseline-in.$$", baseline) if baseline else "")
    key = _authorize_key(ssh_user, ssh_public_key) if ssh_public_key else ""
    return (
        _header("push", stack_name, files.host, d)
        + f'WINDOW="${{ENCLAVE_ROLLBACK_SECONDS:-{ROLLBACK_SECONDS_DEFAULT}}}"\n'
        + install_helpers()
        + f"export ENCLAVE_HOST={shlex.quote(files.host)}\n"
        + f'sh "$STATE/apply.sh" install {int(install_wait_s)} || {{ echo "$ME: nothing was changed" >&2; exit 1; }}\n'
        + f"trap 'rm -rf {new} {base}' EXIT\n"
        + f"if ! out=$( (\n{write}) 2>&1); then\n"
        + '  echo "$ME: could not be written to $STATE: ${out:-no space left?}; nothing was changed" >&2; exit 1\nfi\n'
        + key
        + f'sh "$STATE/apply.sh" push {new} "$WINDOW"' + (f" {base}" if baseline else "") + "\n"
    )


def confirm_script(files: RuleFiles, stack_name: str, *, ssh_user: str = "root", ssh_public_key: str | None = None) -> str:
    """Promote the pushed rules to confirmed. Run over a NEW SSH connection after push_script succeeded.

    ssh_public_key: this connection logged in with it, so every other key enclave authorized before is removed
    (key rotation never locks out, and ends with only the new key enclave-managed)."""
    d = digest(files)
    retire = _retire_keys(ssh_user, ssh_public_key) if ssh_public_key else ""
    return (
        _header("confirm", stack_name, files.host, d)
        + f"export ENCLAVE_HOST={shlex.quote(files.host)}\n"
        + f'sh "$STATE/apply.sh" confirm {d} || exit 1\n'
        + retire
    )


def baseline_script(files: RuleFiles, *, bastion: bool = False) -> str:
    """First boot (cloud-init bootcmd, every boot): install helpers and baseline, restore confirmed or baseline.

    bastion: also raise sshd's MaxStartups (a drop-in in ENCLAVE_SSHD_CONFIG_DIR, default
    /etc/ssh/sshd_config.d; written only there or on the default state directory, so a lab never touches this
    machine's sshd)."""
    d = digest(files)
    drop_in = ""
    if bastion:
        drop_in = (
            'if [ -n "${ENCLAVE_SSHD_CONFIG_DIR:-}" ] || [ "$STATE" = ' + f'"{STATE_DIR_DEFAULT}" ]; then\n'
            '  SSHD_DIR="${ENCLAVE_SSHD_CONFIG_DIR:-/etc/ssh/sshd_config.d}"\n'
            f'  mkdir -p "$SSHD_DIR" && printf \'# enclave: bastions take every operator connection\\nMaxStartups {BASTION_MAX_STARTUPS}\\n\' '
            f'> "$SSHD_DIR/{SSHD_DROP_IN}.tmp" && mv -f "$SSHD_DIR/{SSHD_DROP_IN}.tmp" "$SSHD_DIR/{SSHD_DROP_IN}"\n'
            "fi\n"
        )
    return (
        f"#!/bin/sh\n# enclave baseline {files.host}, rules {d}: closed before any service listens\nset -u\numask 077\n{STATE}\n"
        + install_helpers()
        + drop_in
        + "trap 'rm -rf \"$STATE/baseline-in.$$\"' EXIT\n"
        + "if (\n" + _write_dir("$STATE/baseline-in.$$", files) + "); then\n"
        + '  sh "$STATE/apply.sh" baseline "$STATE/baseline-in.$$"\nfi\n'
        + 'sh "$STATE/apply.sh" restore\n'
    )


def install_script() -> str:
    """cloud-init's runcmd (the final stage, first boot only): install what a stock image lacks, then bring the
    full baseline in force (apply.sh install)."""
    return f'{STATE}\nsh "$STATE/apply.sh" install {INSTALL_WAIT_DEFAULT}\n'


def cloud_config(
    baseline: RuleFiles, *, ssh_user: str = "root", ssh_public_key: str | None = None, bastion: bool = False,
    apt_proxy: str | None = None,
) -> str:
    """Droplet user data: cloud-init runs bootcmd on every boot, early in its init stage, before sshd starts.

    On the first boot that applies the baseline; after a push it restores the last confirmed rules (as the
    systemd unit already did, earlier still). Built from the role's baseline only, never from peers.
    runcmd (the final stage, once per instance: the network is up and apt's sources and proxy are configured)
    installs what a stock image lacks (ipset; iptables on Debian) and then brings the full baseline in force.
    A non-root ssh_user is created with ssh_public_key and passwordless sudo (DigitalOcean installs keys for
    root only); bastions raise sshd's MaxStartups; apt_proxy is apt's proxy for a droplet without a mirror.
    """
    return _cloud_config(baseline, ssh_user, ssh_public_key, bastion, apt_proxy)


# Every droplet of a role boots with the same baseline, and YAML-quoting its script costs about 9 ms: render
# each distinct baseline once (1 000 hosts under mocks spent 9 s here).
@functools.lru_cache(maxsize=256)
def _cloud_config(baseline: RuleFiles, ssh_user: str, ssh_public_key: str | None, bastion: bool,
                  apt_proxy: str | None) -> str:
    import yaml  # here: every push run imports this module and never needs YAML (enclave.rulefiles)

    document: dict[str, object] = {
        "bootcmd": [["sh", "-c", baseline_script(baseline, bastion=bastion)]],
        "runcmd": [["sh", "-c", install_script()]],
    }
    if apt_proxy:
        # cc_apt_configure writes these into /etc/apt/apt.conf.d/90cloud-init-aptproxy before runcmd runs
        document["apt"] = {"http_proxy": apt_proxy, "https_proxy": apt_proxy}
    if ssh_user != "root":
        _authorized_keys_file(ssh_user)  # the same name check
        user: dict[str, object] = {
            "name": ssh_user,
            "shell": "/bin/bash",
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "lock_passwd": True,
        }
        if ssh_public_key:
            _key_fields(ssh_public_key)
            user["ssh_authorized_keys"] = [" ".join(ssh_public_key.split())]
        # "default" first: a users list replaces the image's own, and root's keys (DigitalOcean's) come with it
        document["users"] = ["default", user]
    return "#cloud-config\n" + yaml.safe_dump(document, default_flow_style=False, width=1 << 16)
