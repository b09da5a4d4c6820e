"""The host program: the shell files that run on every host (read as package data by enclave.push and
enclave.audit, which prepend only a few shell-quoted values and the rule files as here-documents)."""
