#!/bin/sh
# enclave audit.sh DIR: reads only. Prints each section after a `== name` line (enclave.audit parses them): the
# host's state, its live filter tables and sets, and the compiled files of DIR (ipsets, rules.v4, rules.v6) as
# this host's iptables saves them once loaded in a scratch network namespace (its own netfilter tables and
# ipsets, gone with its sh). enclave.audit.audit_script writes DIR and sets it as $1.
set -u
STATE="${ENCLAVE_STATE_DIR:-/var/lib/enclave}"
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
echo "== confirmed"; cat "$STATE/confirmed/digest" 2>/dev/null
echo "== pending"; cat "$STATE/pending" 2>/dev/null
echo "== rolled-back"; cat "$STATE/rolled-back" 2>/dev/null
echo "== live4"; iptables-save -t filter
echo "== live6"; ip6tables-save -t filter
echo "== sets"; ipset save
# shellcheck disable=SC2016 # the inner sh expands $1, not this one
unshare -n sh -c '
  ipset restore < "$1/ipsets" >&2 || exit 1
  echo "== want4"; iptables-restore -w < "$1/rules.v4" >&2 && iptables-save -t filter
  echo "== want6"; ip6tables-restore -w < "$1/rules.v6" >&2 && ip6tables-save -t filter
  echo "== wantsets"; ipset save' audit "$1"
