"""`enclave`: the offline command line. Same loading, compiler and renderer as the Pulumi program.

Exit codes: 0 fine, 1 a check failed (a stack test, a lab probe), 2 bad input (stack file, flag).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from config.schema import StackError
from config.stackfile import Stack, load_stack, load_stack_file

from .plan import Plan, build_plan, droplet_name, load_addresses
from .compiler import compile_policy

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

Command = Callable[[argparse.Namespace, Console], int]


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--stack", "-s", help="stack name: reads stacks/Pulumi.<stack>.yaml (default: dev)")
    group.add_argument("--stack-file", type=Path, help="path to a Pulumi.<stack>.yaml file")


def stack_from_args(args: argparse.Namespace) -> Stack:
    if args.stack_file is not None:
        return load_stack_file(args.stack_file)
    return load_stack(args.stack or "dev")


# ----------------------------------------------------------------------------------------------- plan


def print_plan(plan: Plan, console: Console) -> None:
    hosts = Table(title=f"stack {plan.stack.name}: {len(plan.policy.hosts)} hosts", title_justify="left")
    for column in ("host", "droplet", "role", "private", "public", "public6", "rules"):
        hosts.add_column(column)
    for h in plan.policy.hosts:
        a = plan.addresses[h.name]
        hosts.add_row(
            h.name, droplet_name(plan.stack.name, h), h.role, a.private, a.public, a.public6 or "-",
            str(plan.files[h.name].rule_count),
        )
    console.print(hosts)

    flows = Table(title="flows: who may open connections to whom", title_justify="left")
    for column in ("from", "to", "ports", "via", "why"):
        flows.add_column(column)
    for f in plan.policy.flows:
        flows.add_row(str(f.source), f.role, " ".join(str(p) for p in f.ports), f.interface, f.why)
    console.print(flows)

    if plan.tests:
        tests = Table(title="tests", title_justify="left")
        for column in ("test", "expect", "seen", "result", "detail"):
            tests.add_column(column)
        for t in plan.tests:
            verdict = "[green]pass[/]" if t.passed else "[red bold]FAIL[/]"
            tests.add_row(t.describe(), t.test.expect, t.seen, verdict, t.detail)
        console.print(tests)


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    stack = stack_from_args(args)
    addresses = load_addresses(args.addresses, compile_policy(stack.config)) if args.addresses else None
    plan = build_plan(stack, addresses)
    if args.host is not None and args.host not in plan.files:
        console.print(f"[red]--host {args.host}: no such host; hosts are {', '.join(plan.files)}[/]")
        return EXIT_BAD_INPUT
    if args.format == "json":
        data = plan.to_json()
        if args.host:
            files = plan.files[args.host]
            data = {"host": args.host, "rules.v4": files.ipv4, "rules.v6": files.ipv6, "ipsets": files.ipsets}
        print(json.dumps(data, indent=2))
    elif args.host:
        files = plan.files[args.host]
        for title, text in (("ipsets", files.ipsets), ("rules.v4", files.ipv4), ("rules.v6", files.ipv6)):
            # exact file contents: written raw, never wrapped or highlighted
            sys.stdout.write(f"### {args.host}: {title}\n{text}")
    else:
        print_plan(plan, console)
    if not plan.ok:
        failed = [t for t in plan.tests if not t.passed]
        console.print(f"[red bold]{len(failed)} test(s) failed against the compiled policy:[/]")
        for t in failed:
            console.print(f"  {t.describe()}, but it would be {t.seen}: {t.detail}", markup=False)
        return EXIT_FAILED
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclave",
        description="Isolate DigitalOcean droplets in a private network: plan, prove in a lab, then `pulumi up`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="hosts, flows, test verdicts and rule files, offline")
    add_stack_arguments(plan)
    plan.add_argument("--host", help="print this host's exact rule files (e.g. mysql-1)")
    plan.add_argument("--addresses", type=Path, help="JSON file of real addresses {host: {public, private, public6}}")
    plan.add_argument("--format", choices=("text", "json"), default="text")
    plan.set_defaults(func=cmd_plan)

    from .lab import cli as lab_cli  # the lab registers its own subcommands

    lab_cli.register(sub, add_stack_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Piped output (CI logs, `| less`) gets room for the tables instead of rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    func: Command = args.func
    try:
        return func(args, console)
    except StackError as exc:
        err = Console(stderr=True)
        err.print(f"[red bold]error:[/] {exc.source}: {len(exc.issues)} problem(s); nothing was created or changed")
        for issue in exc.issues:
            err.print(f"  [bold]{issue.path}[/]: {issue.message}", highlight=False)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
