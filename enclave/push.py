"""The one shell command that installs a host's rule files: the same text for Pulumi, the lab and the CLI.

Sequence on the host (POSIX sh, runs as root; every step before "apply" changes nothing live):
  1. write the three files to $STATE/incoming (STATE defaults to /var/lib/enclave);
  2. stage ipset members in ".new" twins (creates missing sets empty: no rule references them yet);
  3. make sure INPUT/OUTPUT jump to ENCLAVE-INPUT/ENCLAVE-OUTPUT first (empty chains change nothing);
  4. `iptables-restore --test` and `ip6tables-restore --test`: a bad file stops here, nothing applied;
  5. apply: swap each staged set in, then `iptables-restore --noflush`, `ip6tables-restore --noflush`
     (each one kernel transaction: never a moment with the host open or half-filtered);
  6. destroy enclave sets no rule uses any more; keep the files as $STATE/current for the boot restore.

Only enclave's chains and sets are replaced; other tools' chains and tables are left as they are.
Pushing the same files twice leaves `iptables-save` unchanged.
"""

from __future__ import annotations

import hashlib

from .render import CHAIN_PREFIX, SET_PREFIX, RuleFiles, staging_name

HEREDOC = "ENCLAVE_EOF"
STATE_DIR_DEFAULT = "/var/lib/enclave"


def digest(files: RuleFiles) -> str:
    """Identifies a host's rules: equal digests, equal rules (the push re-runs exactly when it changes)."""
    h = hashlib.sha256()
    for part in (files.ipv4, files.ipv6, files.ipsets):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _heredoc(path: str, text: str) -> str:
    assert HEREDOC not in text
    return f"cat > {path} <<'{HEREDOC}'\n{text}{HEREDOC}\n"


def push_script(files: RuleFiles, stack_name: str) -> str:
    """A POSIX sh script, fed to `sh -s` as root on the host, that applies `files` safely."""
    sets = " ".join(files.set_names)
    swaps = "".join(f"swap {staging_name(s)} {s}\\ndestroy {staging_name(s)}\\n" for s in files.set_names)
    return f"""#!/bin/sh
# enclave push: stack {stack_name}, host {files.host}, rules {digest(files)}
set -eu
umask 077
STATE="${{ENCLAVE_STATE_DIR:-{STATE_DIR_DEFAULT}}}"
mkdir -p "$STATE/incoming"
# On failure: drop the staged twins, and sets this push created (destroy refuses a set a rule still uses).
unstage() {{ for s in {sets}; do ipset destroy "$s.new" 2>/dev/null || true; ipset destroy "$s" 2>/dev/null || true; done; }}
fail() {{ unstage; echo "enclave push {files.host}: $*" >&2; exit 1; }}
{_heredoc('"$STATE/incoming/ipsets"', files.ipsets)}{_heredoc('"$STATE/incoming/rules.v4"', files.ipv4)}{_heredoc('"$STATE/incoming/rules.v6"', files.ipv6)}
ipset -exist restore < "$STATE/incoming/ipsets" || fail "ipset definitions rejected; nothing was changed"
for t in iptables ip6tables; do
  for c in INPUT OUTPUT; do
    $t -w -n -L {CHAIN_PREFIX}-$c >/dev/null 2>&1 || $t -w -N {CHAIN_PREFIX}-$c
    $t -w -C $c -j {CHAIN_PREFIX}-$c 2>/dev/null || $t -w -I $c 1 -j {CHAIN_PREFIX}-$c
  done
done
iptables-restore -w --test --noflush < "$STATE/incoming/rules.v4" || fail "IPv4 rules rejected; nothing was changed"
ip6tables-restore -w --test --noflush < "$STATE/incoming/rules.v6" || fail "IPv6 rules rejected; nothing was changed"
printf '{swaps}' | ipset restore || fail "ipset swap failed"
iptables-restore -w --noflush < "$STATE/incoming/rules.v4" || fail "IPv4 rules failed to apply"
ip6tables-restore -w --noflush < "$STATE/incoming/rules.v6" || fail "IPv6 rules failed to apply"
for s in $(ipset list -n | grep '^{SET_PREFIX}' || true); do
  case " {sets} " in *" $s "*) ;; *) ipset destroy "$s" 2>/dev/null || true ;; esac
done
rm -rf "$STATE/current" && mv "$STATE/incoming" "$STATE/current"
echo "enclave push {files.host}: applied rules {digest(files)}"
"""


