"""`enclave audit`: is every host running exactly what the stack compiles to? Read-only, over the push's transport.

Per host, over SSH (enclave.transport: the same config, keys, bastion master and known_hosts as a push), one
read-only `sh -s` that prints the host's confirmed digest, a pending push, the rollback note, its live enclave
chains (`iptables-save`/`ip6tables-save`) and sets (`ipset save`), and the compiled files as THIS host's
iptables would save them: loaded into a scratch network namespace (`unshare -n`), so the comparison is
iptables' canonical text against iptables' canonical text whatever spelling the renderer uses, and nothing
live is touched. Drift found:

  rolled back/stale  the confirmed digest is not the compiled one: a push rolled back (the host's own note says
                     why), or the host was never pushed the stack's current rules
  pending            a push applied but not confirmed (a run in progress, or one killed: it will roll back)
  flushed            enclave's chains are empty or INPUT/OUTPUT no longer jump to them (a `iptables -F`, a reboot
                     without the boot unit)
  foreign rule       a rule in enclave's chains the stack does not compile to (someone's `iptables -I`)
  missing rule       a compiled rule that is not live
  set members        a set whose live members differ from the compiled ones
  host key changed   the droplet was rebuilt from the panel (or someone is in between): nothing was read
  unreachable        SSH could not get in at all
  changes a packet   the live rules (every chain, other tools' rules included, and the live sets) do not equal
                     the policy for every packet: the verifier (enclave.verify) gives the packet, the live rule
                     that decided it and what the policy says

Every host read also gets the verifier's verdict on its live rules (`proof`): equal to the policy for every
NEW packet (then a foreign rule is harmless, and says so), the packets they change, or why they could not be
proved (a construct the verifier does not model, named with its line).

Each drifted host gets the commands that re-push it: raise its re-push counter (`enclave:repush`), which changes
its push's input, then `pulumi up --target <urn>` of its push resource. The engine runs that as an update, which
keeps the previous run's output and with it the bastion it was confirmed through (`pulumi up --replace` would
re-create the push from empty outputs and lose that fallback).
Exit: 0 every host as compiled, 1 drift on any host, 2 bad input (stack, addresses, key file).
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from dataclasses import dataclass, field
from typing import Any

from config.stackfile import Stack

from . import kernelstate
from .compiler import Addresses, Policy
from .kernelstate import KernelState, KernelStateError
from .plan import droplet_name
from .ipsets import parse_ipsets
from .push import heredoc, digest, host_files, host_program
from .pushrun import _remote_shell, push_request
from .resource_names import push_urn  # the URN the program's push resource has (tests/unit/test_program.py)
from .render import FORWARD_CHAIN, INPUT_CHAIN, OUTPUT_CHAIN, SET_PREFIX, RuleFiles
from .transport import SSH_FAILED, Transport, TransportFactory
from .verify.engine import Difference, VerifyError
from .verify.parse import ParseError
from .verify.prove import HostText, Prover

AUDIT_DEADLINE_S = 30
SECTIONS = ("confirmed", "pending", "rolled-back", "live4", "live6", "sets", "want4", "want6", "wantsets")


def repush_command(stack: Stack, host: str, droplet: str) -> str:
    """The fix printed for a drifted host: raise its re-push counter and update its push (module docstring;
    tests/unit/test_program.py runs it under mocks)."""
    count = stack.config.repush.get(host, 0) + 1
    return (f"pulumi config set --stack {stack.name} --path 'repush[\"{host}\"]' {count} && "
            f"pulumi up --stack {stack.name} --target '{push_urn(stack.name, droplet)}'")


def audit_script(files: RuleFiles) -> str:
    """Read-only (enclave/host/audit.sh): prints each section after a `== name` line. The compiled files, as
    they land on the host (enclave.push.host_files), are written to a temporary directory given as audit.sh's
    $1; they are loaded only inside a scratch network namespace."""
    on_host = host_files(files)
    return (
        f"#!/bin/sh\n# enclave audit: host {files.host}, compiled rules {digest(files)} (reads only)\n"
        "compiled=$(mktemp -d) || exit 1\ntrap 'rm -rf \"$compiled\"' EXIT\n"
        + "".join(heredoc(f'"$compiled/{name}"', on_host[name]) for name in ("ipsets", "rules.v4", "rules.v6"))
        + 'set -- "$compiled"\n'
        + host_program("audit.sh")
    )


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("== ") and line[3:] in SECTIONS:
            current = out.setdefault(line[3:], [])
        elif current is not None:
            current.append(line)
    return out


def _kernel_state(sections: dict[str, list[str]], ipv4: str, ipv6: str, sets: str) -> KernelState:
    """One side of the comparison (live, or the compiled files as saved from the scratch namespace) read by the
    same reader as the lab's proof (enclave.kernelstate)."""
    return kernelstate.read(*("\n".join(sections.get(key, [])) for key in (ipv4, ipv6, sets)))


def _jumps(state: KernelState, family: str) -> set[str]:
    """The jumps apply.sh places (INPUT to ENCLAVE-INPUT, OUTPUT to ENCLAVE-OUTPUT) that are live."""
    return state.jumps(family) & {f"-A INPUT -j {INPUT_CHAIN}", f"-A OUTPUT -j {OUTPUT_CHAIN}"}


def _members(lines: list[str]) -> dict[str, set[str]]:
    """enclave's sets and their members from `ipset save`."""
    return {name: set(members) for name, (_, members) in parse_ipsets("\n".join(lines), SET_PREFIX).items()}


@dataclass
class HostAudit:
    host: str
    droplet: str
    address: str
    compiled: str
    confirmed: str | None = None
    drift: list[str] = field(default_factory=list)
    fix: list[str] = field(default_factory=list)
    proof: str = ""  # the verifier's verdict on the live rules ("" when nothing was read)

    @property
    def in_sync(self) -> bool:
        return not self.drift

    def as_json(self) -> dict[str, Any]:
        return {"host": self.host, "droplet": self.droplet, "address": self.address, "compiled": self.compiled,
                "confirmed": self.confirmed, "inSync": self.in_sync, "drift": self.drift, "fix": self.fix,
                "proof": self.proof}


MATCH_SET = re.compile(r"--match-set (\S+) ")
SHOWN_PACKETS = 3  # packets a changed verdict is shown with (the proof counts them all)
# differences kept per host: enough that the ones for NEW packets are among them when replies differ too
LIVE_LIMIT = 200


def live_text(host: str, sections: dict[str, list[str]]) -> HostText:
    """A host's live saves for the verifier. Only the sets its rules match are kept: other tools' sets
    (fail2ban's, with timeouts) change no verdict unless a rule matches them."""
    v4, v6 = ("\n".join(sections.get(key, [])) + "\n" for key in ("live4", "live6"))
    used = set(MATCH_SET.findall(v4 + v6))
    sets = "\n".join(line for line in sections.get("sets", [])
                     if len(line.split()) > 1 and line.split()[1] in used) + "\n"
    return HostText(host, v4, v6, sets, f"{host} (live)")


def changes_new_packets(d: Difference) -> bool:
    """A difference that matters for the live verdict: it holds for NEW packets arriving on (or leaving by) a
    network interface. Replies (ESTABLISHED, RELATED), INVALID and UNTRACKED packets, and loopback packets (the
    verifier lets lo carry any source address, the kernel only the host's own), are not counted: fail2ban's
    REJECT of a banned address, for one, also differs for replies to a connection that NEW never let open."""
    return "NEW" in d.states and d.packet.iface != "lo"


def prove_live(prover: Prover, host: str, sections: dict[str, list[str]]) -> tuple[str, list[Difference] | None]:
    """The verifier's verdict on a host's live rules: (a sentence, the differences for NEW packets, or None if
    no proof could be made)."""
    try:
        proof = prover.prove(live_text(host, sections))
    except ParseError as exc:
        return f"not proved: the verifier does not model {exc.source} line {exc.line} ({exc.why}): {exc.text[:160]}", None
    except VerifyError as exc:
        return f"not proved: {exc}", None
    changed = [d for d in proof.differences if changes_new_packets(d)]
    if proof.proved:
        return f"proved: the live rules equal the policy for every packet ({proof.atoms} classes of packets)", []
    if not changed and sum(len(d.states) for d in proof.differences) < proof.disagreeing:
        return (f"not proved: {proof.disagreeing} classes of packets differ, more than the {LIVE_LIMIT} the audit "
                "lists, and none of those listed is a NEW packet; prove the saves with `enclave prove --rules`"), None
    if not changed:
        first = proof.differences[0]
        return (f"proved for every NEW packet on the network interfaces ({proof.atoms} classes of packets); "
                f"{proof.disagreeing} classes differ only for replies, INVALID or loopback packets, e.g. "
                f"{first.describe()}"), []
    return (f"NOT proved: the live rules give NEW packets another verdict than the policy ({proof.disagreeing} of "
            f"{proof.atoms} classes of packets differ)"), changed


def with_proof(drift: list[str], changed: list[Difference] | None) -> list[str]:
    """The drift, each foreign rule marked harmless when the live rules are proved equal to the policy for
    every NEW packet, and the packets the live rules change when they are not."""
    if changed is None:
        return drift
    if not changed:
        return [f"{line} (harmless: the live rules equal the policy for every NEW packet)"
                if line.startswith("foreign rule") else line for line in drift]
    shown = [f"changes a packet: {d.describe()}" for d in changed[:SHOWN_PACKETS]]
    if len(changed) > SHOWN_PACKETS:
        shown.append(f"changes a packet: … and {len(changed) - SHOWN_PACKETS} more")
    return drift + shown


def compare(files: RuleFiles, sections: dict[str, list[str]]) -> list[str]:
    """What differs between a host's live state and its compiled files, in an operator's words."""
    drift = []
    want = digest(files)
    confirmed = (sections.get("confirmed") or [""])[0].strip() or None
    note = " ".join(sections.get("rolled-back", [])).strip()
    if confirmed != want:
        drift.append(("rolled back" if note else "stale")
                     + f": confirmed rules {confirmed or 'none (baseline)'}, the stack compiles to {want}"
                     + (f" ({note})" if note else ""))
    pending = " ".join(sections.get("pending", [])).strip()
    if pending:
        drift.append(f"pending: rules {pending.split()[0]} were applied and await their confirmation "
                     "(a push in progress, or one that was killed: the host rolls them back by itself)")
    if "want4" not in sections or "wantsets" not in sections:
        drift.append("the compiled files could not be loaded in a scratch namespace on the host (unshare, ipset?)")
        return drift
    try:
        live_state = _kernel_state(sections, "live4", "live6", "sets")
        wanted_state = _kernel_state(sections, "want4", "want6", "wantsets")
    except KernelStateError as exc:
        drift.append(f"the host's saved rules could not be read: {exc}")
        return drift
    for family in kernelstate.FAMILIES:
        live, wanted = live_state.enclave_rules(family), wanted_state.enclave_rules(family)
        jumps = _jumps(live_state, family)
        # a chain the compiled rules fill but the host has empty (`iptables -F ENCLAVE-INPUT`): each is told alone,
        # since the other chains (ENCLAVE-FORWARD's copies of the accepts) may still hold rules
        emptied = [chain for chain in (INPUT_CHAIN, OUTPUT_CHAIN, FORWARD_CHAIN)
                   if any(line.startswith(f"-A {chain} ") for line in wanted)
                   and not any(line.startswith(f"-A {chain} ") for line in live)]
        if len(jumps) < 2:
            drift.append(f"flushed: {family} INPUT/OUTPUT do not jump to enclave's chains")
        elif emptied:
            drift.append(f"flushed: {family} enclave's chain{'s' if len(emptied) > 1 else ''} {', '.join(emptied)} "
                         f"{'are' if len(emptied) > 1 else 'is'} empty")
        if any(line.startswith(f"-A {FORWARD_CHAIN} ") for line in wanted) and \
                f"-A DOCKER-USER -j {FORWARD_CHAIN}" not in live_state.jumps(family):
            drift.append(f"unhooked: {family} DOCKER-USER does not jump to {FORWARD_CHAIN} (published container ports "
                         "are not policed)")
        if live and wanted:
            foreign = [line for line in live if line not in wanted]
            missing = [line for line in wanted if line not in live and line.split()[1] not in emptied]  # told above
            drift += [f"foreign rule ({family}): {line}" for line in foreign]
            drift += [f"missing rule ({family}): {line}" for line in missing[:5]]
            if len(missing) > 5:
                drift.append(f"missing rule ({family}): … and {len(missing) - 5} more")
            if not foreign and not missing and not emptied and live != wanted:
                drift.append(f"{family} rules in another order than compiled")
    live_sets, wanted_sets = live_state.enclave_sets(), wanted_state.enclave_sets()
    for name in sorted(set(wanted_sets) | set(live_sets)):
        if name not in wanted_sets:
            continue  # a set of a previous push, destroyed once no rule uses it
        if name not in live_sets:
            drift.append(f"set members: {name} does not exist")
        elif live_sets[name] != wanted_sets[name]:
            extra, gone = sorted(live_sets[name] - wanted_sets[name]), sorted(wanted_sets[name] - live_sets[name])
            drift.append(f"set members: {name}" + (f" has {', '.join(extra[:5])} too" if extra else "")
                         + (f" lacks {', '.join(gone[:5])}" if gone else ""))
    return drift


def audit_host(stack: Stack, policy: Policy, addresses: dict[str, Addresses], files: RuleFiles,
               private_key: str, transport: TransportFactory = Transport, prover: Prover | None = None) -> HostAudit:
    """One host's audit over `transport` (OpenSSH; a fake in tests)."""
    host = policy.host_by_name[files.host]
    request = push_request(stack.name, policy, addresses, host, files, user=stack.config.ssh_user,
                           public_key="", deadline_s=AUDIT_DEADLINE_S)
    droplet = droplet_name(stack.name, host)
    result = HostAudit(files.host, droplet, request.address, digest(files))
    replace = repush_command(stack, files.host, droplet)
    with transport(stack=stack.name, user=request.user, private_key=private_key, previous_private_key=None,
                   address=request.address, bastions=request.bastions) as ssh:
        via = None if request.direct else request.bastions[0]
        done = ssh.run(via, _remote_shell(request.user), audit_script(files), confirm=False,
                       deadline=time.monotonic() + AUDIT_DEADLINE_S)
        known_hosts = ssh.known_hosts
    if done.host_key_changed:
        result.drift.append(f"host key changed: {droplet} answers with another host key than when it was first "
                            "pushed (rebuilt from the panel?); nothing was read")
        changed = done.changed_host_key_address or request.address
        if changed != request.address:
            result.drift[-1] = f"host key changed: the bastion {changed} on the way to {droplet} (rebuilt?); nothing was read"
        result.fix += ["# check the new key on the droplet's console: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub",
                       f"ssh-keygen -R {changed} -f {known_hosts}", replace]
        return result
    if done.returncode == SSH_FAILED:
        result.drift.append(f"unreachable: {done.stderr.strip()[-500:] or 'no output'}")
        result.fix.append(f"# once SSH gets in again (or from the droplet's Recovery Console), re-push: {replace}")
        return result
    sections = _sections(done.stdout)
    result.confirmed = (sections.get("confirmed") or [""])[0].strip() or None
    result.proof, new_packets = prove_live(prover or Prover(policy, addresses, LIVE_LIMIT), files.host, sections)
    result.drift = with_proof(compare(files, sections), new_packets)
    if done.returncode != 0:
        result.drift.append(f"the audit script failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    if result.drift:
        result.fix.append(replace)
    return result


def audit(stack: Stack, policy: Policy, addresses: dict[str, Addresses], files: dict[str, RuleFiles],
          private_key: str, parallel: int = 8) -> list[HostAudit]:
    prover = Prover(policy, addresses, LIVE_LIMIT)  # hosts with the same live rules are proved once
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda f: audit_host(stack, policy, addresses, f, private_key, prover=prover),
                             files.values()))
