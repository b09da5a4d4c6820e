"""Benchmarks: scripts that measure enclave and print tables (`make bench` writes docs/benchmarks.md).

They are not tests: nothing here asserts on a timing. `python -m benchmarks --help` lists the parts.
"""
