"""`enclave lab check | up | down`: prove a stack's rules on real netfilter, on this machine, as root."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from config.stackfile import Stack

from ..exitcodes import Exit
from ..stackargs import add_stack_arguments, stack_from_args
from .lab import Lab, LabError, LabUnavailable, destroy_run, invoking_user, lab_records, preflight
from .probe import HarnessError, LabReport
from .progress import lab_progress
from .report import print_report



def _stack(args: argparse.Namespace) -> Stack:
    """The stack exactly as `enclave plan` loads and refuses it (same messages, exit 2), before any namespace."""
    return stack_from_args(args)


def _guarded(run: Callable[[argparse.Namespace, Console], int]) -> Callable[[argparse.Namespace, Console], int]:
    """Lab failures become a message and an exit code; the Lab context manager has already cleaned up."""

    def command(args: argparse.Namespace, console: Console) -> int:
        err = Console(stderr=True)
        try:
            return run(args, console)
        except LabUnavailable as exc:
            err.print(Text(f"error: {exc}", style="red bold"))
            return Exit.BAD_INPUT
        except HarnessError as exc:
            err.print(Text(f"lab harness failed, no verdict on the rules: {exc}", style="red bold"))
            return Exit.HARNESS
        except LabError as exc:
            err.print(Text(f"lab failed: {exc}", style="red bold"))
            return Exit.FAILED
        except KeyboardInterrupt:
            err.print("[yellow]interrupted: the lab was removed[/]")
            return Exit.INTERRUPTED

    return command


def _exit_code(report: LabReport) -> int:
    if report.harness_failed:
        return Exit.HARNESS
    return Exit.OK if report.ok else Exit.FAILED


def _run_lab(stack: Stack, keep: bool, exhaustive: bool | None) -> tuple[Lab, LabReport]:
    # Progress goes to stderr: stdout stays the report alone (and the JSON with --format json).
    with lab_progress(Console(stderr=True)) as progress:
        with Lab(stack, progress=progress, exhaustive=exhaustive) as lab:
            lab.push_all()
            report = lab.probe()
            if keep:
                lab.keep()
    return lab, report


def cmd_check(args: argparse.Namespace, console: Console) -> int:
    lab, report = _run_lab(_stack(args), keep=False, exhaustive=args.exhaustive)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=1 if len(report.outcomes) < 2000 else None))
    else:
        print_report(report, console)
    return _exit_code(report)


def cmd_up(args: argparse.Namespace, console: Console) -> int:
    lab, report = _run_lab(_stack(args), keep=True, exhaustive=args.exhaustive)
    print_report(report, console)
    console.print(f"\n[bold]lab {lab.run_id} is up[/] (stack {escape(lab.stack.name)}). Explore it:")
    for line in lab.explore_help():
        console.print(f"  {line}", markup=False, highlight=False)
    console.print(f"ssh config: {lab.ssh_config_path}; lab directory: {lab.dir}", markup=False, highlight=False)
    return _exit_code(report)


def cmd_down(args: argparse.Namespace, console: Console) -> int:
    preflight()
    me = invoking_user()
    every = lab_records()
    # Only labs this user started: on a shared machine another person's kept lab is theirs to remove (by its
    # RUN_ID, which names one lab on purpose).
    # A lab that recorded no user (an older enclave) is nobody's for sure: it is left to `lab down RUN_ID` too.
    records = [r for r in every if r.user == me or args.run_id == r.run_id]
    others = [r for r in every if r not in records]
    if args.run_id:
        targets = [args.run_id]
    elif args.all:
        # kept labs, and labs whose controller died; a running `lab check` (or test) cleans up after itself
        targets = [r.run_id for r in records if r.kept or not r.owner_alive]
        if others:
            console.print(f"left {len(others)} lab(s) of other users alone: "
                          + ", ".join(f"{r.run_id} ({r.user or 'unknown user'})" for r in others)
                          + "; `enclave lab down RUN_ID` removes one of them", markup=False)
    else:
        kept = [r for r in records if r.kept]
        if len(kept) > 1:
            console.print("several labs are up; name one (enclave lab down RUN_ID) or use --all:")
            for r in kept:
                console.print(f"  {r.run_id}  stack {r.stack}", markup=False)
            return Exit.BAD_INPUT
        targets = [r.run_id for r in kept]
    if not targets:
        console.print("no enclave lab is up")
        return Exit.OK
    for run_id in targets:
        removed = destroy_run(run_id)
        if not removed and not any(r.run_id == run_id for r in records):
            console.print(f"[red]no lab {run_id}[/]; labs: {', '.join(r.run_id for r in records) or 'none'}")
            return Exit.BAD_INPUT
        console.print(f"lab {run_id}: removed {len(removed)} namespaces", markup=False)
    return Exit.OK


def register(sub: Any) -> None:
    """Add the lab's subcommands to the `enclave` parser."""
    lab = sub.add_parser(
        "lab", help="prove a stack's rules with real packets in network namespaces (root)",
        description="Build the stack's network out of Linux network namespaces on this machine (root), push every "
        "host's rules over real SSH as `pulumi up` does, and probe every flow with real packets.")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    check = lab_sub.add_parser(
        "check", help="build the lab, push every host over SSH, probe every flow, print the matrix, tear down",
        description="Build the lab for the stack, push every host's rules over SSH as `pulumi up` does, prove each "
        "host's live rules equal the compiled ones, probe every flow with real packets, print the matrix, and "
        "remove the lab. Exit 0 when every probe saw what the stack expects.",
    )
    add_stack_arguments(check)
    check.add_argument("--format", choices=("text", "json"), default="text",
                       help="json: a summary, each host's proof, the tests, every mismatch, and every probe (src, "
                            "dst, address, port, expected, seen, why) up to 20 000 (a per-role summary above)")
    _add_mode(check)
    check.set_defaults(func=_guarded(cmd_check))

    up = lab_sub.add_parser(
        "up", help="like check, but keep the lab running to explore it",
        description="Like `enclave lab check`, but keep the lab's namespaces running afterwards to explore them "
        "(it prints the run id and how to enter each host); `enclave lab down` removes it.")
    add_stack_arguments(up)
    _add_mode(up)
    up.set_defaults(func=_guarded(cmd_up))

    down = lab_sub.add_parser(
        "down", help="remove a kept lab (the only one, RUN_ID, or --all)",
        description="Remove a lab `enclave lab up` kept: the only one, the one RUN_ID names, or with --all every "
        "kept lab of yours and any of yours whose controller died.")
    down.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run id `enclave lab up` printed")
    down.add_argument("--all", action="store_true",
                      help="every kept lab of yours, and any of yours whose controller died")
    down.set_defaults(func=_guarded(cmd_down))



def _add_mode(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--exhaustive", dest="exhaustive", action="store_true", default=None,
                      help="probe from every host and outsider to every host (the default up to 20 000 probes, "
                           "about 20 prod-shaped hosts)")
    mode.add_argument("--sample", dest="exhaustive", action="store_false",
                      help="probe from and to the first and last host of each role (the default above that); "
                           "every host's live rules are proven equal to the compiled ones either way")
