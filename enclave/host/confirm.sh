# enclave confirm.sh: promote the pushed rules to confirmed, over a NEW SSH connection after the push. The caller
# (enclave.push.confirm_script) set STATE, ME, HOST, DIGEST, SSH_USER and KEYLINE (empty: no key rotation) and
# defined retire_keys (keys.sh): this connection logged in with KEYLINE, so every other key enclave authorized
# before is retired.
export ENCLAVE_HOST="$HOST"
sh "$STATE/apply.sh" confirm "$DIGEST" || exit 1
if [ -n "$KEYLINE" ]; then retire_keys "$SSH_USER" "$KEYLINE"; fi
