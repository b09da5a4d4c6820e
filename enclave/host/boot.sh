# enclave boot.sh: cloud-init's bootcmd, on every boot before any service listens: the baseline installed, then
# the confirmed rules (or the baseline) restored. The caller (enclave.push.baseline_script) set STATE,
# MAX_STARTUPS (empty: not a bastion) and SSHD_DROP_IN, defined write_rules DIR (here-documents of the
# baseline's rule files) and installed apply.sh (install.sh).
if [ -n "$MAX_STARTUPS" ]; then sh "$STATE/apply.sh" sshd-drop-in "$SSHD_DROP_IN" "$MAX_STARTUPS"; fi
trap 'rm -rf "$STATE/baseline-in.$$"' EXIT
if (write_rules "$STATE/baseline-in.$$"); then
  sh "$STATE/apply.sh" baseline "$STATE/baseline-in.$$"
fi
sh "$STATE/apply.sh" restore
