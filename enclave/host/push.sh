# enclave push.sh: the push's steps on the host (fed to `sh -s`; re-run exactly when the rules change). The
# caller (enclave.push.push_script) first set STATE, ME, HOST, ROLLBACK_SECONDS, INSTALL_WAIT, SSH_USER, KEYLINE
# (empty: no key to authorize) and BASELINE (empty: none), defined write_rules DIR and write_baseline DIR
# (here-documents of the rule files) and authorize_key (keys.sh), and installed apply.sh (install.sh).
WINDOW="${ENCLAVE_ROLLBACK_SECONDS:-$ROLLBACK_SECONDS}"
export ENCLAVE_HOST="$HOST"
sh "$STATE/apply.sh" install "$INSTALL_WAIT" || { echo "$ME: nothing was changed" >&2; exit 1; }
new="$STATE/incoming.$$"; base="$STATE/baseline-in.$$"
trap 'rm -rf "$new" "$base"' EXIT
if ! out=$( (write_rules "$new" && { [ -z "$BASELINE" ] || write_baseline "$base"; }) 2>&1); then
  echo "$ME: could not be written to $STATE: ${out:-no space left?}; nothing was changed" >&2; exit 1
fi
if [ -n "$KEYLINE" ]; then authorize_key "$SSH_USER" "$KEYLINE" || exit 1; fi
if [ -n "$BASELINE" ]; then sh "$STATE/apply.sh" push "$new" "$WINDOW" "$base"; else sh "$STATE/apply.sh" push "$new" "$WINDOW"; fi
