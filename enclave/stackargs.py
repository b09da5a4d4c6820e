"""`--stack` / `--stack-file`: how every `enclave` command (the lab's too) names a stack, and loads it.

Its own module so that enclave.cli and enclave.lab.cli both import it, and neither imports the other's loader.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from config.schema import StackError, StackIssue, stack_name_issues
from config.stackfile import Stack, load_stack, load_stack_file

from .cloudfirewall import check_cloud_firewalls
from .compiler import compile_policy
from .limits import check_limits


# The stack every command (and `make plan`, `make lab`: the Makefile's STACK) reads when none is named: the one
# the README walks through.
DEFAULT_STACK = "prod"


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--stack", "-s", help=f"stack name: reads stacks/Pulumi.<stack>.yaml (default: {DEFAULT_STACK})")
    group.add_argument("--stack-file", type=Path, help="path to a Pulumi.<stack>.yaml file (the stack is <stack>)")
    parser.add_argument("--stack-name", help="with a --stack-file not named Pulumi.<stack>.yaml: the stack's name "
                        "(it names droplets, tags and ssh aliases)")


def stack_file_name(path: Path, given: str | None) -> str:
    """The stack a --stack-file is: --stack-name, else <stack> of its name Pulumi.<stack>.yaml, else a refusal
    (a file `my.yaml` silently named the stack `my`, which then named every droplet)."""
    parts = path.name.split(".")
    if given is not None or (len(parts) >= 3 and parts[0] == "Pulumi" and parts[-1] in ("yaml", "yml")):
        name = given if given is not None else ".".join(parts[1:-1])
        issues = stack_name_issues(name, None, "--stack-name" if given is not None else "(stack name, from the file name)")
        if issues:
            raise StackError(issues, "--stack-name" if given is not None else str(path)[:200])
        return name
    if not os.path.isfile(path):  # os.path: a name too long is "not a file"; the loader then says what it is
        return path.stem
    raise StackError([StackIssue("--stack-file", (
        f"{str(path)[:200]!r} is not named Pulumi.<stack>.yaml, so it names no stack; rename it, or add "
        "--stack-name <stack> (the name Pulumi knows it by: droplets, tags and ssh aliases carry it)"))],
        "--stack-file")


def stack_from_args(args: argparse.Namespace) -> Stack:
    """The stack the command line names, checked as `pulumi up` checks it (its limits included)."""
    if args.stack_file is not None:
        stack = load_stack_file(args.stack_file, stack_file_name(args.stack_file, args.stack_name), flag="--stack-file")
    elif args.stack_name is not None:
        raise StackError([StackIssue("--stack-name", "names the stack of a --stack-file; with a stack of stacks/, "
                                     "use --stack <stack>")], "--stack-name")
    else:
        stack = load_stack(args.stack if args.stack is not None else DEFAULT_STACK)  # `--stack ''` is refused
    policy = compile_policy(stack.config)
    check_limits(stack, policy)  # rules per host and set members, counted as rendered
    if stack.config.cloud_firewall:
        # the provider's limits, checked here as the Pulumi program checks them: before anything exists
        check_cloud_firewalls(stack.name, policy)
    return stack
