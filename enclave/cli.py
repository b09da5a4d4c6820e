"""`enclave`: the offline command line. Same loading, compiler and renderer as the Pulumi program.

Exit codes: enclave.exitcodes (`enclave --help` prints them).

For users: docs/cli.md (every command and flag) and README.md (the quickstart).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config.schema import StackError, StackIssue
from config.stackfile import Stack, load_stack_file

from .plan import Plan, build_plan, droplet_name, egress_rows, example_addresses, load_addresses, role_rows
from .compiler import Addresses, Policy, compile_policy
from .cloudfirewall import OPEN_OUTBOUND, check_cloud_firewalls
from .diagram import DiagramError, write_diagram
from .diff import compare_stacks, diff_lines
from .private import install_warnings
from .exitcodes import Exit, exit_code_table
from .push import host_files
from .sshconfig import SshConfigError, ssh_config
from .stackargs import add_stack_arguments, stack_from_args
from .lab import cli as lab_cli
from .verify import cli as verify_cli
from .verify.stacktests import TestProof, prove_tests

ADDRESSES_HELP = (
    "JSON file of real addresses {host: {public, private, public6}}, e.g. from "
    "`pulumi stack output hosts --json > addrs.json`"
)

Command = Callable[[argparse.Namespace, Console], int]
SHOWN_HOSTS = 10  # a refusal lists this many hosts of a fleet, not 5 000


def shown(text: str, limit: int = 60) -> str:
    """A user's value quoted back in a message, cut so that a 100 000-character flag costs a short line."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


def no_such_host(host: str, known: list[str], where: str) -> StackError:
    listed = ", ".join(known[:SHOWN_HOSTS]) + (f" … and {len(known) - SHOWN_HOSTS} more" if len(known) > SHOWN_HOSTS else "")
    return StackError([StackIssue("--host", f"{shown(host)}: {where}; hosts are {listed or 'none'}")], "--host")


# ----------------------------------------------------------------------------------------------- plan


def print_plan(plan: Plan, console: Console, proofs: list[TestProof]) -> None:
    hosts = Table(title=f"stack {plan.stack.name}: {len(plan.policy.hosts)} hosts", title_justify="left")
    for column in ("host", "droplet", "role", "private", "public", "public6", "rules"):
        hosts.add_column(column)
    for h in plan.policy.hosts:
        a = plan.addresses[h.name]
        hosts.add_row(
            h.name, droplet_name(plan.stack.name, h), h.role, a.private, a.public or "none (public: false)", a.public6 or "-",
            str(plan.files[h.name].rule_count),
        )
    console.print(hosts)

    roles = Table(title="roles", title_justify="left")
    for column in ("role", "hosts", "egress", "description"):
        roles.add_column(column)
    for row in role_rows(plan.policy):
        roles.add_row(*row)
    console.print(roles)

    flows = Table(title="flows: who may open connections to whom", title_justify="left")
    for column in ("from", "to", "ports", "via", "why"):
        flows.add_column(column)
    for f in plan.policy.flows:
        why = f.why + (f" ({f.description})" if f.description else "")
        flows.add_row(str(f.source), f.role, " ".join(str(p) for p in f.ports), f.interface, why)
    console.print(flows)

    if plan.policy.egress:
        egress = Table(title="egress allowlists: where else these roles may open connections", title_justify="left")
        for column in ("from", "to", "ports", "via", "why"):
            egress.add_column(column)
        for entry in egress_rows(plan.policy):
            egress.add_row(*entry)
        console.print(egress)

    if plan.tests:
        tests = Table(title="tests: judged by the policy, proved for every packet by the rules", title_justify="left")
        for column in ("test", "expect", "seen", "result", "every packet", "detail"):
            tests.add_column(column)
        for t, proof in zip(plan.tests, proofs):
            verdict = "[green]pass[/]" if t.passed else "[red bold]FAIL[/]"
            proved = "[green]proved[/]" if proof.passed else f"[red bold]FAIL ({proof.seen})[/]"
            detail = "; ".join(x for x in (t.detail, proof.counterexample) if x)
            tests.add_row(t.describe(), t.test.expect, t.seen, verdict, proved, escape(detail))
        console.print(tests)

    firewalls = check_cloud_firewalls(plan.stack.name, plan.policy)
    if firewalls:
        table = Table(title="cloud firewalls (enclave:cloudFirewall)", title_justify="left")
        for column in ("firewall", "applies to tag", "inbound rules", "outbound rules", "rules"):
            table.add_column(column)
        for fw in firewalls:
            outbound = "open" if fw.outbound_rules == OPEN_OUTBOUND else "\n".join(str(r) for r in fw.outbound_rules)
            table.add_row(fw.name, ", ".join(fw.tags), "\n".join(str(r) for r in fw.inbound_rules), outbound,
                          str(fw.rule_count))
        console.print(table)

    for warning in install_warnings(plan.stack.config):
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)


def report_failed_tests(plan: Plan, console: Console, proofs: list[TestProof] | None = None) -> int:
    """Exit 1 when a test fails against the compiled policy or, proved for every packet, against the rules."""
    failed = [t for t in plan.tests if not t.passed]
    unproved = [p for p in proofs or [] if not p.passed]
    if failed:
        console.print(f"[red bold]{len(failed)} test(s) failed against the compiled policy:[/]")
        for t in failed:
            console.print(f"  {t.describe()}, but it would be {t.seen}: {t.detail}", markup=False)
    if unproved:
        console.print(f"[red bold]{len(unproved)} test(s) do not hold for every packet the rules see:[/]")
        for p in unproved:
            console.print(f"  {p.describe()}, but the rules make it {p.seen}, e.g. {p.counterexample}",
                          markup=False, soft_wrap=True)
    return Exit.FAILED if failed or unproved else Exit.OK


def cmd_plan_diff(args: argparse.Namespace, stack: Stack, console: Console) -> int:
    """`plan --diff-from OLD`: per host, the rule lines and set members the change from OLD would touch."""
    if not os.path.exists(args.diff_from):  # os.path: a name too long is "does not exist", not an OSError
        raise StackError(
            [
                StackIssue(
                    "--diff-from",
                    f"{args.diff_from} does not exist; give the stack file as deployed, e.g. "
                    f"`git show HEAD:stacks/Pulumi.{stack.name}.yaml > /tmp/old.yaml` then --diff-from /tmp/old.yaml",
                )
            ],
            str(args.diff_from),
        )
    old = load_stack_file(args.diff_from, stack.name, flag="--diff-from")
    old_addresses = load_addresses(args.addresses, compile_policy(old.config)) if args.addresses else None
    plan, diff = compare_stacks(stack, old.config, old_addresses)
    if args.host is not None:
        known = [h.host for h in diff.hosts]
        diff.hosts = [h for h in diff.hosts if h.host == args.host]
        if not diff.hosts:
            raise no_such_host(args.host, known, "in neither stack")
    if args.format == "json":
        print(json.dumps(diff.to_json(), indent=2))
    else:
        console.print(
            f"stack {stack.name}: changes from {args.diff_from} to {stack.path}", markup=False, highlight=False,
            soft_wrap=True,  # a long path is printed whole, not cut at the console's width
        )
        for style, line in diff_lines(diff):
            # rule lines are shown whole, never wrapped, so they can be searched for and copied
            console.print(line, style=style or None, markup=False, highlight=False, soft_wrap=True)
    return report_failed_tests(plan, console)


# The rule files of a host, byte for byte as they land (enclave.push.host_files adds only the digest, the host
# name, the list of sets and their checksums).
LANDED_FILES = ("ipsets", "rules.v4", "rules.v6")


def write_landed_files(plan: Plan, hosts: list[str], output: Path) -> None:
    """`plan --output DIR`: DIR/<host>/{ipsets,rules.v4,rules.v6} for each host (DIR is created if missing)."""
    def refuse(why: str) -> StackError:
        return StackError([StackIssue("--output", f"{shown(str(output))} {why}; give a directory to write "
                                      f"<host>/rules.v4, rules.v6 and ipsets under, e.g. --output plan-{plan.stack.name}")],
                          "--output")
    if os.path.exists(output) and not os.path.isdir(output):
        raise refuse("exists and is not a directory")
    try:
        for host in hosts:
            landed = host_files(plan.files[host])
            (output / host).mkdir(parents=True, exist_ok=True)
            for name in LANDED_FILES:
                (output / host / name).write_bytes(landed[name].encode())
    except OSError as e:
        raise refuse(f"cannot be written: {e.strerror or e}") from None


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    stack = stack_from_args(args)
    if args.diff_from is not None:
        return cmd_plan_diff(args, stack, console)
    addresses = load_addresses(args.addresses, compile_policy(stack.config)) if args.addresses else None
    plan = build_plan(stack, addresses)
    if args.host is not None and args.host not in plan.files:
        raise no_such_host(args.host, list(plan.files), "no such host")
    proofs = prove_tests(plan.policy, plan.addresses, plan.files)  # every test, for every packet (the verifier)
    if args.output is not None:
        hosts = [args.host] if args.host else list(plan.files)
        write_landed_files(plan, hosts, args.output)
        console.print(f"wrote {', '.join(LANDED_FILES)} of {len(hosts)} hosts under {args.output}/<host>/",
                      markup=False, highlight=False, soft_wrap=True)
    elif args.format == "json":
        data = plan.to_json()
        for entry, proof in zip(data["tests"], proofs):
            entry.update(proved=proof.passed, seenByRules=proof.seen, counterexample=proof.counterexample)
        data["ok"] = data["ok"] and all(p.passed for p in proofs)
        firewalls = check_cloud_firewalls(stack.name, plan.policy)
        if firewalls:
            data["cloudFirewalls"] = [dataclasses.asdict(fw) for fw in firewalls]
        if args.host:
            landed = host_files(plan.files[args.host])
            data = {"host": args.host, **{name: landed[name] for name in ("rules.v4", "rules.v6", "ipsets")}}
        print(json.dumps(data, indent=2))
    elif args.host:
        landed = host_files(plan.files[args.host])
        for name in LANDED_FILES:
            # exact file contents, as they land on the host: written raw, never wrapped or highlighted
            sys.stdout.write(f"### {args.host}: {name}\n{landed[name]}")
    else:
        print_plan(plan, console, proofs)
    # with --format json, stdout holds the JSON alone: the failures are told on stderr
    return report_failed_tests(plan, Console(stderr=True) if args.format == "json" else console, proofs)


# ------------------------------------------------------------------------------------ diagram, ssh-config


def diagram_output(given: str | None, stack_name: str) -> Path:
    """Where `--output` puts the pair `<output>.svg` and `<output>.mmd`: a path without extension; a directory
    (or a path ending in /) gets `<dir>/<stack>.svg`; an existing device or other non-file is refused."""
    if given is None:
        return Path(stack_name)
    def refuse(why: str) -> StackError:
        return StackError([StackIssue("--output", f"{why}; give a path without extension, e.g. --output docs/{stack_name} "
                                      f"(writes docs/{stack_name}.svg and docs/{stack_name}.mmd)")], "--output")
    if not given:
        raise refuse("is empty")
    output = Path(given)
    if given.endswith("/") or os.path.isdir(output):
        return output / stack_name
    for path in (output, output.with_name(output.name + ".svg"), output.with_name(output.name + ".mmd")):
        if os.path.exists(path) and not os.path.isfile(path):
            raise refuse(f"{shown(str(path))} is not a regular file (a device, a pipe or a socket)")
    return output


def cmd_diagram(args: argparse.Namespace, console: Console) -> int:
    stack = stack_from_args(args)
    output = diagram_output(args.output, stack.name)
    try:
        written = write_diagram(stack, output)
    except DiagramError as exc:
        Console(stderr=True).print(f"[red bold]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return Exit.FAILED
    except OSError as exc:
        Console(stderr=True).print(
            f"[red bold]error:[/] --output {escape(str(output))}: cannot write there ({exc.strerror}); "
            "pick a writable directory, e.g. --output docs/prod",
            highlight=False,
            soft_wrap=True,
        )
        return Exit.BAD_INPUT
    for path in written:
        console.print(f"wrote {path}", markup=False, highlight=False)
    return Exit.OK


def addresses_from_args(args: argparse.Namespace, policy: Policy, note: str) -> dict[str, Addresses]:
    """--addresses as deployed, or the plan's example addresses with `note` on stderr saying so."""
    if args.addresses is not None:
        return load_addresses(args.addresses, policy)
    Console(stderr=True).print(f"note: {note}", highlight=False, soft_wrap=True)
    return example_addresses(policy)


def cmd_ssh_config(args: argparse.Namespace, console: Console) -> int:
    stack = stack_from_args(args)
    policy = compile_policy(stack.config)
    addresses = addresses_from_args(
        args, policy, "example addresses (nothing is deployed offline); pass --addresses FILE.json, "
        "or after `pulumi up` use `pulumi stack output sshConfig`",
    )
    try:
        text = ssh_config(stack.name, policy, addresses, stack.config.ssh_user, identity_file=args.identity_file)
    except SshConfigError as exc:
        raise StackError([StackIssue("--identity-file", str(exc))], "--identity-file") from None
    # raw text on stdout, so `enclave ssh-config --stack prod > ~/.ssh/enclave-prod.conf` is the whole file
    sys.stdout.write(text)
    return Exit.OK


def cmd_audit(args: argparse.Namespace, console: Console) -> int:
    from .audit import audit  # imports the transport: only when auditing

    stack = stack_from_args(args)
    policy = compile_policy(stack.config)
    addresses = addresses_from_args(
        args, policy, "example addresses (those of `enclave lab`); for a deployed stack pass --addresses "
        "FILE.json from `pulumi stack output hosts --json`",
    )
    key_path = Path(args.identity_file or f"~/.ssh/enclave-{stack.name}").expanduser()
    try:
        private_key = key_path.read_text()
    except OSError as exc:
        raise StackError([StackIssue("--identity-file", f"cannot read the stack's private key {key_path}: "
                                     f"{exc.strerror}; pass the key `pulumi config set --secret sshPrivateKey` holds")],
                         stack.name) from None
    plan = build_plan(stack, addresses)
    results = audit(stack, policy, addresses, plan.files, private_key)
    drifted = [r for r in results if not r.in_sync]
    if args.format == "json":
        sys.stdout.write(json.dumps({"stack": stack.name, "inSync": not drifted,
                                     "hosts": [r.as_json() for r in results]}, indent=2) + "\n")
        return Exit.FAILED if drifted else Exit.OK
    for r in results:
        state = "[green]in sync[/]" if r.in_sync else "[red bold]DRIFT[/]"
        console.print(f"{escape(r.host)} ({escape(r.address)}): {state}, rules {r.compiled}", highlight=False)
        if r.proof:
            console.print(f"  {r.proof}", highlight=False, soft_wrap=True, markup=False)
        for line in r.drift:
            console.print(f"  - {escape(line)}", highlight=False, soft_wrap=True)
        for line in r.fix:
            console.print(f"    {escape(line)}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"stack {escape(stack.name)}: " + (f"{len(drifted)} of {len(results)} host(s) drifted" if drifted
                  else f"all {len(results)} hosts run the rules the stack compiles to"), highlight=False)
    return Exit.FAILED if drifted else Exit.OK


# ----------------------------------------------------------------------------------------------- main


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal; the exit-code table (the epilog) kept line for line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("exit codes:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def installed_version() -> str:
    """The version pyproject.toml gives, as installed into the venv (`make setup`)."""
    try:
        return importlib.metadata.version("enclave")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without `make setup`
        return "unknown (not installed: run `make setup`)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclave",
        description="Isolate DigitalOcean droplets in a private network: plan, prove in a lab, then `pulumi up`.",
        epilog=exit_code_table() + "\n\n`enclave COMMAND --help` for each command.",
        formatter_class=HelpFormatter,  # the epilog is a table: keep its lines
    )
    parser.add_argument("--version", action="version", version=f"enclave {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser(
        "plan", help="hosts, flows, test verdicts and rule files, offline",
        description="The stack's hosts, flows and test verdicts, or one host's exact rule files, or what a change "
        "does to each host; offline, with example addresses unless --addresses gives real ones.",
    )
    add_stack_arguments(plan)
    plan.add_argument("--host", help="print this host's exact rule files, as they land on it (e.g. mysql-1)")
    plan.add_argument("--output", "-o", type=Path, metavar="DIR",
                      help="write every host's rule files (or --host's) as DIR/<host>/rules.v4, rules.v6, ipsets, "
                      "byte for byte what lands on it")
    plan.add_argument("--addresses", type=Path, help=ADDRESSES_HELP)
    plan.add_argument("--format", choices=("text", "json"), default="text", help="json: the same, for scripts")
    plan.add_argument(
        "--diff-from", type=Path, metavar="OLD.yaml",
        help="show what changing from this stack file (the deployed one) would change on each host; "
        "--addresses then gives the deployed hosts' addresses",
    )
    plan.set_defaults(func=cmd_plan)

    diagram = sub.add_parser(
        "diagram", help="draw the network: <output>.svg (Graphviz) and <output>.mmd (Mermaid)",
        description="Draw the stack's compiled flows: <output>.svg (Graphviz) and <output>.mmd (Mermaid).",
    )
    add_stack_arguments(diagram)
    diagram.add_argument(
        "--output", "-o", help="path without extension (default: ./<stack>), e.g. docs/prod; a directory: <dir>/<stack>"
    )
    diagram.set_defaults(func=cmd_diagram)

    ssh = sub.add_parser(
        "ssh-config", help="an OpenSSH client config: every host by name, private ones via the bastion",
        description="Print an OpenSSH client config (Host <stack>-<host>; private hosts through the bastion), "
        "the same text `pulumi stack output sshConfig` gives after `pulumi up`.",
    )
    add_stack_arguments(ssh)
    ssh.add_argument("--addresses", type=Path, help=ADDRESSES_HELP)
    ssh.add_argument("--identity-file", help="private key for every host (default: ~/.ssh/enclave-<stack>)")
    ssh.set_defaults(func=cmd_ssh_config)

    audit = sub.add_parser(
        "audit", help="does every host run the rules the stack compiles to? (over SSH, read-only)",
        description="Connect to every host through the push's transport and compare its live rules, sets and "
        "confirmed digest with what the stack compiles to; drift gets the commands that re-push "
        "the host. Exit 1 on drift.",
    )
    add_stack_arguments(audit)
    audit.add_argument("--addresses", type=Path, help=ADDRESSES_HELP + " (without it: the lab's example addresses)")
    audit.add_argument("--identity-file", help="the stack's private key (default: ~/.ssh/enclave-<stack>)")
    audit.add_argument("--format", choices=("text", "json"), default="text", help="json: the same, for scripts")
    audit.set_defaults(func=cmd_audit)

    verify_cli.register(sub, add_stack_arguments, ADDRESSES_HELP, stack_from_args)  # prove, explain, reach
    lab_cli.register(sub)  # the lab's subcommands
    # `enclave COMMAND --help` ends with the same exit-code table as `enclave --help`
    for command in _subparsers(parser):
        command.epilog = exit_code_table()
        command.formatter_class = HelpFormatter
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


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
        # soft_wrap: a path or a key is never cut in two, whatever the terminal width
        # A stack the command refused is one `pulumi up` would refuse before creating anything: say so. A bad
        # flag (an unknown --host, an --output that cannot be written) says nothing about the stack.
        flag = any(issue.path.startswith("--") for issue in exc.issues)
        err.print(
            f"[red bold]error:[/] {escape(exc.source)}: {len(exc.issues)} problem(s)"
            + ("" if flag else "; nothing was created or changed"),
            highlight=False, soft_wrap=True,
        )
        for issue in exc.issues:
            # escaped: messages quote the user's text and examples like `[tcp/80, tcp/443]`, which rich would
            # otherwise read as markup tags and silently drop
            err.print(f"  [bold]{escape(issue.path)}[/]: {escape(issue.message)}", highlight=False, soft_wrap=True)
        return Exit.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
