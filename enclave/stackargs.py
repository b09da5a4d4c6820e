"""`--stack` / `--stack-file`: how every `enclave` command (the lab's too) names a stack, and loads it.

Its own module so that enclave.cli and enclave.lab.cli both import it, and neither imports the other's loader.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from config.stackfile import Stack, load_stack, load_stack_file

from .cloudfirewall import check_cloud_firewalls
from .compiler import compile_policy
from .limits import check_limits


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--stack", "-s", help="stack name: reads stacks/Pulumi.<stack>.yaml (default: dev)")
    group.add_argument("--stack-file", type=Path, help="path to a Pulumi.<stack>.yaml file")


def stack_from_args(args: argparse.Namespace) -> Stack:
    """The stack the command line names, checked as `pulumi up` checks it (its limits included)."""
    if args.stack_file is not None:
        stack = load_stack_file(args.stack_file, flag="--stack-file")
    else:
        stack = load_stack(args.stack if args.stack is not None else "dev")  # `--stack ''` is refused, not dev
    policy = compile_policy(stack.config)
    check_limits(stack, policy)  # rules per host and set members, counted as rendered
    if stack.config.cloud_firewall:
        # the provider's limits, checked here as the Pulumi program checks them: before anything exists
        check_cloud_firewalls(stack.name, policy)
    return stack
