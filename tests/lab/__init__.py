"""Tests on real netfilter, namespaces and sshd: they need root (make test runs them)."""
