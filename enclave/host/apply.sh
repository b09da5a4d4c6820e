#!/bin/sh
# enclave apply.sh: the one routine behind push, confirm, rollback and boot, installed as $STATE/apply.sh.
# CHAIN_PREFIX (ENCLAVE), SET_PREFIX (enclave-) and RULE_DIR_FILES are written out here; tests/unit/test_host_files.py
# checks they equal the Python constants (enclave.rulefiles, config.names, enclave.push).
#   apply.sh push DIR WINDOW [BASELINE_DIR]  prove DIR, arm the rollback, apply it, mark it pending
#   apply.sh confirm DIGEST                  promote the applied pending DIGEST to confirmed
#   apply.sh rollback TOKEN WINDOW           (the timer) restore the confirmed rules unless TOKEN was confirmed
#   apply.sh restore (or --restore)          boot: close, void a pending push, restore confirmed/baseline/closed
#   apply.sh baseline DIR                    install DIR as the baseline (first boot)
#   apply.sh install [WAIT]                  add the packages a stock image lacks (cloud-init runcmd, every push)
#   apply.sh sshd-drop-in FILE MAX_STARTUPS  raise a bastion's sshd MaxStartups (boot)
#   apply.sh DIR                             prove and apply a rule directory by hand
set -u
umask 077
STATE="${ENCLAVE_STATE_DIR:-/var/lib/enclave}"
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
ME="enclave"
why=""; now=""
say() { echo "$ME $*" >&2; }
# The commands this program runs, each with the Debian/Ubuntu package that ships it. No stock image has ipset;
# Debian's has no iptables either (Priority optional): `apply.sh install` adds those two.
TOOLS="iptables-restore:iptables ip6tables-restore:iptables iptables:iptables ip6tables:iptables ipset:ipset
unshare:util-linux flock:util-linux setsid:util-linux sha256sum:coreutils awk:mawk cmp:diffutils getent:libc-bin"
# missing_tools: one "COMMAND (package PACKAGE)" line per command not found.
missing_tools() {
  for tp in $TOOLS; do
    command -v "${tp%%:*}" >/dev/null 2>&1 || echo "${tp%%:*} (package ${tp#*:})"
  done
}
# Test hook (tests/lab/test_lab_faults.py): a no-op unless ENCLAVE_TEST_KILL_AT names this step; then, once (the
# marker directory), this script and the push/confirm that started it die here as under kill -9.
checkpoint() {
  if [ "${ENCLAVE_TEST_KILL_AT:-}" = "$1" ] && mkdir "$STATE/test-killed-at-$1" 2>/dev/null; then
    kill -9 ${ENCLAVE_TOP_PID:-} $$
  fi
}

# write_file PATH TEXT: temporary file, fsync, rename, fsync the directory.
write_file() {
  printf '%s\n' "$2" > "$1.tmp.$$" && sync "$1.tmp.$$" && mv -f "$1.tmp.$$" "$1" && sync "$(dirname "$1")" && return 0
  rm -f "$1.tmp.$$"; return 1
}
# flip LINK TARGET: point a symlink at TARGET with one rename (never a moment without it).
flip() {
  if [ -d "$1" ] && [ ! -L "$1" ]; then rm -rf "$1.legacy" && mv "$1" "$1.legacy" || return 1; fi
  ln -sfn "$2" "$1.lnk.$$" && mv -fT "$1.lnk.$$" "$1" && sync "$STATE" && { rm -rf "$1.legacy"; return 0; }
  rm -f "$1.lnk.$$"; return 1
}
# intact DIR: every file present and as SHA256SUMS says (written where the rules were rendered).
intact() {
  [ -f "$1/SHA256SUMS" ] || return 1
  [ "$(awk '{print $2}' "$1/SHA256SUMS" | tr '\n' ' ')" = "digest host ipsets rules.v4 rules.v6 sets " ] || return 1
  (cd "$1" && sha256sum -c --status SHA256SUMS) 2>/dev/null
}
about() { echo "$(cat "$1/host" 2>/dev/null || echo '?'): rules $(cat "$1/digest" 2>/dev/null || echo '?')"; }

# prove DIR: apply it for real in a scratch network namespace: the kernel judges every set, rule and target
# (iptables-restore --test on nf_tables accepts an unknown target). Prints the kernel's complaint on failure.
prove() {
  unshare --net sh -c '
    [ ! -s "$1/ipsets" ] || ipset restore < "$1/ipsets" 2>&1 || { echo "ipset definitions rejected"; exit 1; }
    iptables-restore < "$1/rules.v4" 2>&1 || { echo "IPv4 rules rejected"; exit 1; }
    ip6tables-restore < "$1/rules.v6" 2>&1 || { echo "IPv6 rules rejected"; exit 1; }' prove "$1" 2>&1
}

# jump_at TOOL CHAIN TARGET: where a missing jump to TARGET goes (printed; nothing if there): after the last jump
# to another tool's chain (fail2ban's f2b-*, Docker's, ufw's), else first: ban chains come before our accepts.
jump_at() {
  $1 -w -C $2 -j $3 2>/dev/null && return 0
  $1 -w -S | awk -v c=$2 '$1 == "-N" { user[$2] = 1 }
    $1 == "-A" && $2 == c { n++; for (i = 3; i < NF; i++) if ($i == "-j" && ($(i+1) in user) && $(i+1) !~ /^ENCLAVE-/) last = n }
    END { print last + 1 }'
}
# jumps: INPUT/OUTPUT to enclave's chains, DOCKER-USER (made as Docker does; never restored: that flushes it) to
# ENCLAVE-FORWARD (render.py). A jump stays where it is; an empty chain returns.
hook() { $1 -w -n -L DOCKER-USER >/dev/null 2>&1 || $1 -w -N DOCKER-USER; $1 -w -C FORWARD -j DOCKER-USER 2>/dev/null || $1 -w -I FORWARD 1 -j DOCKER-USER; }
jumps() {
  for t in iptables ip6tables; do
    for c in INPUT OUTPUT FORWARD; do
      $t -w -n -L ENCLAVE-$c >/dev/null 2>&1 || $t -w -N ENCLAVE-$c || return 1
    done
    hook $t || return 1
    for c in INPUT:ENCLAVE-INPUT OUTPUT:ENCLAVE-OUTPUT DOCKER-USER:ENCLAVE-FORWARD; do
      at=$(jump_at $t ${c%%:*} ${c#*:})
      [ -z "$at" ] || $t -w -I ${c%%:*} "$at" -j ${c#*:} || return 1
    done
  done
}

# harden [DIR]: ICMP redirects off everywhere; DIR's `# sysctl` lines.
harden() {
  for f in /proc/sys/net/ipv[46]/conf/*/accept_redirects /proc/sys/net/ipv4/conf/*/secure_redirects; do
    { echo 0 > "$f"; } 2>/dev/null || say "could not turn off $f"
  done
  [ -n "${1:-}" ] || return 0
  sed -n 's/^# sysctl net\.ipv4\.conf\.\([A-Za-z0-9_.@-]*\)\.rp_filter=\([0-2]\)$/\1 \2/p' "$1/rules.v4" | while read -r i v; do
    { echo "$v" > "/proc/sys/net/ipv4/conf/$i/rp_filter"; } 2>/dev/null || say "could not set $i's rp_filter to $v"
  done
}

# stage DIR: create DIR's sets that do not exist yet (their names are their contents' hash, so an existing one
# already holds these members; one changed by hand is refilled through a swap). Lists created sets in $created.
created=""
stage() {
  for s in $(cat "$1/sets"); do
    if ipset list -n "$s" >/dev/null 2>&1; then
      tmp="enclave-refill-$$"
      ipset destroy "$tmp" 2>/dev/null
      awk -v s="$s" -v t="$tmp" '$2 == s { $2 = t; print }' "$1/ipsets" | ipset restore || return 1
      want=$(ipset save "$tmp" | awk '$1 == "add" { print $3 }' | sort)
      have=$(ipset save "$s" | awk '$1 == "add" { print $3 }' | sort)
      if [ "$want" = "$have" ]; then ipset destroy "$tmp"; continue; fi
      ipset swap "$tmp" "$s" && ipset destroy "$tmp" || return 1
    else
      awk -v s="$s" '$2 == s' "$1/ipsets" | ipset restore || { created="$created $s"; return 1; }
      created="$created $s"
    fi
  done
}
unstage() { for s in $created; do ipset destroy "$s" 2>/dev/null; done; created=""; return 0; }
# sweep: destroy enclave's sets that no rule references any more (the kernel refuses to destroy a referenced one).
sweep() {
  command -v ipset >/dev/null 2>&1 || return 0
  for s in $(ipset list -n | grep '^enclave-'); do
    grep -qx "$s" "$1/sets" 2>/dev/null || ipset destroy "$s" 2>/dev/null
  done
  return 0
}

# apply DIR: sets beside the live ones, then each family in one transaction, then the unreferenced sets go.
# Sets $why on failure (no command substitution around it: the test hook must kill this very process).
apply() {
  jumps || { why="could not place the jumps to enclave's chains"; return 1; }
  stage "$1" || { unstage; why="could not create the sets $(cat "$1/sets" | tr '\n' ' ')"; return 1; }
  checkpoint apply:sets
  rm -f "$STATE/in-force"  # from here until it is written again, "unknown" rather than wrong
  out=$(iptables-restore -w --noflush < "$1/rules.v4" 2>&1) || { unstage; why="IPv4 rules failed to apply: $out"; return 1; }
  checkpoint apply:v4
  out=$(ip6tables-restore -w --noflush < "$1/rules.v6" 2>&1) || { why="IPv6 rules failed to apply: $out"; return 1; }
  checkpoint apply:v6
  created=""
  open_nft
  harden "$1"
  write_file "$STATE/in-force" "$(cat "$1/digest")" || echo "enclave $(about "$1"): in force, but $STATE/in-force could not be written" >&2
  sweep "$1"
}

# closed: the built-in last resort. Policies DROP; ENCLAVE-FORWARD returns replies only;
# ENCLAVE-INPUT admits loopback, replies, neighbour solicitations
# and advertisements (IPv6 cannot resolve its neighbours without them; never router advertisements, which would
# let any neighbour become the gateway) and the baseline's SSH accept lines (by a strict pattern, so a damaged
# baseline still yields them; none: console). One iptables-restore per family sets the policies, fills the chains
# and adds a missing jump together: no moment where the policy drops what the chain would admit (loopback at boot).
# Where iptables cannot do it (a Debian image without the package), the same rules go into an nftables table
# (nft is on every stock image); where neither can, the host is OPEN and says so: $closed_state, then in-force.
ssh_re='^-A ENCLAVE-INPUT( -i [A-Za-z0-9_.@-]+)?( -s [0-9A-Fa-f.:/]+)?( -i [A-Za-z0-9_.@-]+)? -p tcp -m tcp --dport 22( -m comment --comment "[^"]*")? -j ACCEPT$'
closed_state=""
closed_rules() {
  unclosed=""
  for f in 4 6; do
    t=iptables; [ $f = 6 ] && t=ip6tables
    nd=""
    [ $f = 6 ] && for x in 135 136; do nd="$nd
-A ENCLAVE-INPUT -p ipv6-icmp -m icmp6 --icmpv6-type $x -m hl --hl-eq 255 -j ACCEPT"; done
    ssh=$(cat "$STATE/baseline/rules.v$f" 2>/dev/null | grep -E "$ssh_re")
    jump=""
    hook $t 2>/dev/null
    for c in INPUT:ENCLAVE-INPUT OUTPUT:ENCLAVE-OUTPUT DOCKER-USER:ENCLAVE-FORWARD; do
      at=$(jump_at $t ${c%%:*} ${c#*:} 2>/dev/null)
      [ -z "$at" ] || jump="$jump
-I ${c%%:*} $at -j ${c#*:}"
    done
    if printf '*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:ENCLAVE-INPUT - [0:0]\n:ENCLAVE-OUTPUT - [0:0]\n:ENCLAVE-FORWARD - [0:0]\n-A ENCLAVE-INPUT -i lo -j ACCEPT\n-A ENCLAVE-INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT%s\n%s\n-A ENCLAVE-INPUT -m comment --comment "enclave closed: nothing else to restore" -j DROP\n-A ENCLAVE-OUTPUT -o lo -j ACCEPT\n-A ENCLAVE-OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A ENCLAVE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n-A ENCLAVE-FORWARD -j DROP%s\nCOMMIT\n' "$nd" "$ssh" "$jump" \
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
}
# closed_nft: the closed rules as one nftables transaction (a base chain at priority -1, before iptables-nft's:
# a drop there is final, an accept still meets iptables' rules). The baseline's SSH lines are translated.
closed_nft() {
  command -v nft >/dev/null 2>&1 || return 1
  ssh_nft=""
  for f in 4 6; do
    fam=ip; [ $f = 6 ] && fam=ip6
    ssh_nft="$ssh_nft$(cat "$STATE/baseline/rules.v$f" 2>/dev/null | grep -E "$ssh_re" | awk -v fam=$fam '{
      r = ""
      for (i = 1; i < NF; i++) { if ($i == "-i") r = r " iifname \"" $(i+1) "\""; if ($i == "-s") r = r " " fam " saddr " $(i+1) }
      if (r !~ /saddr/) r = r " meta nfproto " (fam == "ip" ? "ipv4" : "ipv6")
      print "  " r " tcp dport 22 accept"
    }')
"
  done
  printf 'table inet enclave_closed\ndelete table inet enclave_closed\ntable inet enclave_closed {\n chain input {\n  type filter hook input priority -1; policy drop;\n  iif "lo" accept\n  ct state established,related accept\n  icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept\n%s }\n chain forward {\n  type filter hook forward priority -1; policy drop;\n }\n}\n' "$ssh_nft" \
    | grep -v '^ *$' | nft -f - 2>/dev/null
}
# open_nft: remove the nftables closed table once iptables holds the rules (it would drop what they admit).
open_nft() {
  if command -v nft >/dev/null 2>&1; then nft delete table inet enclave_closed 2>/dev/null; fi
  return 0
}
closed() {
  rm -f "$STATE/in-force"
  closed_rules
  jumps 2>/dev/null
  harden
  write_file "$STATE/in-force" "$closed_state" || true
}

# restore_chain: the confirmed rules, else the baseline, else closed. Sets $now to what is in force afterwards.
restore_chain() {
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
}

# store DIR: DIR (just proven) becomes $STATE/rules/<digest>, unless that holds exactly these files already.
store() {
  stored="$STATE/rules/$(cat "$1/digest")"
  if intact "$stored" && cmp -s "$1/SHA256SUMS" "$stored/SHA256SUMS"; then return 0; fi
  rm -rf "$stored.old" && { [ ! -e "$stored" ] || mv -T "$stored" "$stored.old"; } && mv -T "$1" "$stored" && sync "$STATE/rules" && rm -rf "$stored.old"
}
lock() { exec 9>>"$STATE/lock" && flock 9; }
pending_field() { awk -v n="$1" 'NR == 1 { print $n }' "$STATE/pending" 2>/dev/null; }

cmd=${1:-}
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
  intact "$dir" || { echo "enclave baseline $d: damaged in transit; not installed" >&2; exit 1; }
  store "$dir" || { echo "enclave baseline $d: could not be stored in $STATE (disk full?)" >&2; exit 1; }
  flip "$STATE/baseline" "rules/$d"
  ;;
install)
  # What a stock image lacks (ipset everywhere, iptables on Debian), from the image's package manager: run by
  # cloud-init's runcmd on the first boot (final stage: the network and apt's sources are configured by then)
  # and by every push before it changes anything. Installs serialise on their own lock, so a push that arrives
  # while cloud-init is installing waits for it (at most WAIT seconds) instead of failing.
  wait_s=${1:-600}; ME="enclave install ${ENCLAVE_HOST:-$(hostname)}:"
  mkdir -p "$STATE" || exit 1
  exec 8>>"$STATE/install.lock"
  flock -w "$wait_s" 8 || { say "another install held $STATE/install.lock for $wait_s s; nothing was changed"; exit 1; }
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
      closed|OPEN*|"") [ -e "$STATE/pending" ] || { restore_chain; echo "$ME installed$installed; in force: $now" >&2; } ;;
    esac
  fi
  ;;
push)
  dir=$1; window=$2; base=${3:-}
  d=$(cat "$dir/digest" 2>/dev/null); ME="enclave push $(cat "$dir/host" 2>/dev/null): rules $d"
  mkdir -p "$STATE/rules" && lock
  checkpoint push:locked
  intact "$dir" || { say "files damaged in transit (SHA256SUMS do not hold); nothing was changed"; exit 1; }
  why=$(prove "$dir") || { say "rejected; nothing was changed: $why"; exit 1; }
  if [ -n "$base" ]; then
    intact "$base" && why=$(prove "$base") || { say "the baseline $(cat "$base/digest") was rejected; nothing was changed: $why"; exit 1; }
  fi
  checkpoint push:proven
  store "$dir" || { say "could not store the rules in $STATE/rules (disk full?); nothing was changed"; exit 1; }
  if [ -n "$base" ]; then
    b=$(cat "$base/digest")
    store "$base" && flip "$STATE/baseline" "rules/$b" \
      || { say "could not store the baseline in $STATE (disk full?); nothing was changed"; exit 1; }
  fi
  # The timer armed, then "pending" written, both before the rules change: whatever is in force unconfirmed
  # always has a rollback armed, and a pending record never outlives its timer. The token tells this push from
  # an earlier push of the same rules (the timer acts only if "pending" still holds its token).
  token="$d.$(date +%s).$$"
  # the timer neither holds this lock (fd 9) nor may the test hook take it for the push it outlives
  ENCLAVE_TOP_PID="" setsid sh "$STATE/apply.sh" rollback "$token" "$window" enclave-rollback </dev/null >/dev/null 2>&1 9>&- &
  checkpoint push:armed
  write_file "$STATE/pending" "$d $token staged" || { say "could not record the pending push in $STATE (disk full?); nothing was changed"; exit 1; }
  checkpoint push:staged
  if ! apply "$STATE/rules/$d"; then
    failed=$why
    restore_chain
    rm -f "$STATE/pending"
    why=$failed
    say "failed to apply: $why; the host went back to $now"; exit 1
  fi
  checkpoint push:applied
  write_file "$STATE/pending" "$d $token applied" || { say "applied, but could not mark it so in $STATE (disk full?); it rolls back in $window s"; exit 1; }
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
  d=$1; ME="enclave confirm ${ENCLAVE_HOST:-host}: rules $d"
  mkdir -p "$STATE" && lock
  checkpoint confirm:locked
  inforce=$(cat "$STATE/in-force" 2>/dev/null)
  if [ "$(pending_field 1)" = "$d" ] && [ "$(pending_field 3)" = applied ] && [ "$inforce" = "$d" ] && intact "$STATE/rules/$d"; then
    flip "$STATE/confirmed" "rules/$d" || { say "could not be promoted in $STATE (disk full?); still pending, a retry can confirm them"; exit 1; }
    checkpoint confirm:promoted
    rm -f "$STATE/pending" "$STATE/rolled-back"
    sync "$STATE"
    # rule directories nothing points at any more
    keep=" $(readlink "$STATE/confirmed") $(readlink "$STATE/baseline") "
    for x in "$STATE"/rules/*; do case "$keep" in *" rules/${x##*/} "*) ;; *) rm -rf "$x" ;; esac; done
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
      why="they are not pending here; in force: ${inforce:-not recorded} (confirmed: $(readlink "$STATE/confirmed" | sed 's|^rules/||'))"
    fi
    say "are not in force: $why"
    echo "The host is on its last confirmed rules. If the new rules cut SSH from the bastion, fix the stack and run pulumi up again." >&2
    exit 1
  fi
  ;;
sshd-drop-in)
  # apply.sh sshd-drop-in FILE MAX_STARTUPS (bastions, at boot): raise sshd's MaxStartups, since a bastion takes
  # every operator's and every push's connection at once. Written only to ENCLAVE_SSHD_CONFIG_DIR or on the
  # default state directory, so a lab never touches the machine's own sshd.
  if [ -n "${ENCLAVE_SSHD_CONFIG_DIR:-}" ] || [ "$STATE" = /var/lib/enclave ]; then
    sshd_dir="${ENCLAVE_SSHD_CONFIG_DIR:-/etc/ssh/sshd_config.d}"
    mkdir -p "$sshd_dir" && printf '# enclave: bastions take every operator connection\nMaxStartups %s\n' "$2" \
      > "$sshd_dir/$1.tmp" && mv -f "$sshd_dir/$1.tmp" "$sshd_dir/$1"
  fi
  ;;
*)
  if [ -d "$cmd" ]; then  # apply.sh DIR: prove and apply a rule directory by hand (pending left alone)
    ME="enclave apply $(about "$cmd")"
    mkdir -p "$STATE" && lock
    why=$(prove "$cmd") || { say "rejected; nothing was changed: $why"; exit 1; }
    apply "$cmd" || { say "failed to apply: $why"; exit 1; }
    exit 0
  fi
  echo "enclave: usage: apply.sh push|confirm|rollback|restore|baseline|install|sshd-drop-in ..."; exit 2 ;;
esac
exit 0
