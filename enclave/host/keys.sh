# enclave keys.sh: the push's SSH key on the host, as two functions the push and the confirm scripts carry
# (enclave.push prepends ME and STATE). Not part of apply.sh, so cloud-init's user data (64 KiB at most) stays small.

# authorized_keys_file USER: prints USER's authorized_keys (the session's own HOME when it is that user, as in
# the lab), or says the user does not exist.
authorized_keys_file() {
  if [ "$(id -un)" = "$1" ] && [ -n "${HOME:-}" ]; then homedir=$HOME; else homedir=$(getent passwd "$1" | cut -d: -f6); fi
  [ -n "$homedir" ] || { echo "$ME: user $1 does not exist" >&2; return 1; }
  echo "$homedir/.ssh/authorized_keys"
}

# authorize_key USER KEYLINE: make sure KEYLINE is in USER's authorized_keys (appended atomically if missing,
# never replacing a line), and remember it in $STATE/authorized-keys as enclave's own line, so a later
# retire_keys may remove it and only it.
authorize_key() {
  akf=$(authorized_keys_file "$1") || return 1
  current=$(printf '%s\n' "$2" | awk '{ print $1, $2; exit }')
  mkdir -p "$(dirname "$akf")" && touch "$akf" || { echo "$ME: cannot write $akf" >&2; return 1; }
  grep -qF -- "$current" "$akf" && return 0
  { cat "$akf"; [ -z "$(tail -c1 "$akf")" ] || echo; echo "$2"; } > "$akf.enclave.$$" && chmod 600 "$akf.enclave.$$" \
    && chown "$1": "$akf.enclave.$$" "$(dirname "$akf")" 2>/dev/null; sync "$akf.enclave.$$" \
    && mv -f "$akf.enclave.$$" "$akf" || { rm -f "$akf.enclave.$$"; echo "$ME: could not authorize the key in $akf (disk full?); nothing was changed" >&2; return 1; }
  { cat "$STATE/authorized-keys" 2>/dev/null; printf '%s\t%s\n' "$akf" "$2"; } > "$STATE/authorized-keys.tmp" && mv -f "$STATE/authorized-keys.tmp" "$STATE/authorized-keys"
}

# retire_keys USER KEYLINE: remove every key enclave authorized before other than KEYLINE's (the confirm logged
# in with it), so a key rotation never locks out and ends with only the new key enclave-managed.
retire_keys() {
  authorized_keys_file "$1" >/dev/null || return 1
  current=$(printf '%s\n' "$2" | awk '{ print $1, $2; exit }')
  [ -s "$STATE/authorized-keys" ] || return 0
  : > "$STATE/authorized-keys.keep.$$"
  while IFS='	' read -r file old; do
    case "$old" in *"$current"*) printf '%s\t%s\n' "$file" "$old" >> "$STATE/authorized-keys.keep.$$"; continue ;; esac
    [ -f "$file" ] || continue
    grep -vxF -- "$old" "$file" > "$file.enclave.$$"; chmod 600 "$file.enclave.$$"
    chown --reference="$file" "$file.enclave.$$" 2>/dev/null; sync "$file.enclave.$$" && mv -f "$file.enclave.$$" "$file" \
      || { rm -f "$file.enclave.$$"; printf '%s\t%s\n' "$file" "$old" >> "$STATE/authorized-keys.keep.$$"; }
  done < "$STATE/authorized-keys"
  mv -f "$STATE/authorized-keys.keep.$$" "$STATE/authorized-keys"
}
