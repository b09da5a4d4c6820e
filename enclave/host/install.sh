# enclave install.sh: (re)installs $STATE/apply.sh and, on systemd hosts, the boot unit; the same text in the
# push and in cloud-init's bootcmd. Run after the caller (enclave.push.install_helpers) set STATE and APPLY_SUM
# (apply.sh's sha256, computed from the packaged file) and wrote $STATE/apply.sh.tmp.$$ and
# $STATE/enclave-firewall.service.tmp.$$ (here-documents of enclave/host/apply.sh and enclave-firewall.service).
echo "$APPLY_SUM  apply.sh" > "$STATE/apply.sh.sha256.tmp.$$"
sync "$STATE/apply.sh.tmp.$$" "$STATE/apply.sh.sha256.tmp.$$" 2>/dev/null
# installed only if it arrived whole, by renames: a running apply.sh is never half-written
if [ "$(sha256sum < "$STATE/apply.sh.tmp.$$" | cut -d" " -f1)" = "$APPLY_SUM" ] && mv -f "$STATE/apply.sh.tmp.$$" "$STATE/apply.sh" \
    && mv -f "$STATE/apply.sh.sha256.tmp.$$" "$STATE/apply.sh.sha256"; then
  :
else
  rm -f "$STATE/apply.sh.tmp.$$" "$STATE/apply.sh.sha256.tmp.$$"
  echo "enclave: could not install $STATE/apply.sh (disk full?)" >&2
fi
# ENCLAVE_SYSTEMD_DIR lets a test harness (the lab) receive the unit without a systemd of its own. The unit
# restores from this state directory, whatever it is: its Environment= line is rewritten to $STATE.
UNITS="${ENCLAVE_SYSTEMD_DIR:-/etc/systemd/system}"
if [ -n "${ENCLAVE_SYSTEMD_DIR:-}" ] || [ -d /run/systemd/system ]; then
  mkdir -p "$UNITS" \
    && UNIT_STATE="$STATE" awk '/^Environment=ENCLAVE_STATE_DIR=/ { $0 = "Environment=ENCLAVE_STATE_DIR=" ENVIRON["UNIT_STATE"] } { print }' \
      "$STATE/enclave-firewall.service.tmp.$$" > "$UNITS/enclave-firewall.service.tmp.$$" \
    && mv -f "$UNITS/enclave-firewall.service.tmp.$$" "$UNITS/enclave-firewall.service"
  [ -n "${ENCLAVE_SYSTEMD_DIR:-}" ] || { systemctl daemon-reload && systemctl enable enclave-firewall.service; } >/dev/null 2>&1 || true
fi
rm -f "$STATE/enclave-firewall.service.tmp.$$"
