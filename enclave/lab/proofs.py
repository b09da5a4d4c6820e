"""Every host's proof from its kernel: its live rules, sets and confirmed digest equal what the compiled files
give a clean kernel (both sides read by enclave.kernelstate, the reader `enclave audit` compares with), and its
live rules proved equal to the policy for every packet by the verifier (enclave.verify, as `enclave audit` does).
Every counterexample the verifier finds is sent as a real packet by the lab's probe agent, and what the kernel
did with it is reported: a proof's packet is checked against the thing itself."""

from __future__ import annotations

import concurrent.futures
import difflib

import ipaddress
from typing import TYPE_CHECKING

from config.schema import PortSpec

from .. import kernelstate
from ..compiler import Endpoint
from ..kernelstate import KernelState
from ..push import baseline_script, confirm_script, digest, push_script
from ..render import baseline_files
from ..verify.engine import Difference, VerifyError
from ..verify.parse import ParseError
from ..verify.prove import HostText, Prover
from .base import OUTSIDERS, LabBase
from .hosts import WIPE_KERNEL_STATE
from .machine import _run
from .probe import AddressKind, HostProof, Outcome, Probe, Target, send_probes

PROBED_COUNTEREXAMPLES = 5  # per host: each is one real packet


def _without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


class Proofs(LabBase):
    """What each host's kernel holds, and what it must hold."""

    if TYPE_CHECKING:  # enclave.lab.topology.Topology, which the Lab combines with this
        def link(self, name: str, kind: AddressKind) -> tuple[str, str, str] | None: ...

    def firewall_state(self, host: str) -> str:
        """What an operator compares before and after a change, read on the host's console: iptables-save,
        ip6tables-save and `ipset save` in their canonical form (enclave.kernelstate)."""
        return kernelstate.read_saved(self.console(host, kernelstate.SAVE_SH).stdout).render()

    def expected_firewalls(self) -> dict[str, KernelState]:
        """Per host, the kernel state the compiler's files must produce.

        Hosts whose files differ only in comments share one; each distinct one is learned once by loading the
        compiled files into a clean kernel (the `scratch` namespace) exactly as a droplet gets them: the role's
        boot baseline, then the push and its confirmation. The rule text is the compiler's; the kernel only
        spells it the way iptables-save and ipset save read it back.
        """
        if self._expected:
            return self._expected
        groups: dict[tuple[str, ...], list[str]] = {}
        for h in self.hosts:
            f = self.plan.files[h.name]
            key = (h.role, *(_without_comments(t) for t in (f.ipv4, f.ipv6, f.ipsets)), *f.set_names)
            groups.setdefault(key, []).append(h.name)
        for n, (key, hosts) in enumerate(groups.items()):
            files = self.plan.files[hosts[0]]
            d = self.dir / "scratch" / str(n)
            env = {"HOME": str(d), "ENCLAVE_STATE_DIR": str(d / "state"), "ENCLAVE_SYSTEMD_DIR": str(d / "units"),
                   "ENCLAVE_ROLLBACK_SECONDS": "3600"}
            baseline = baseline_files(self.stack.config, key[0])
            steps = {"wipe": WIPE_KERNEL_STATE, "boot": baseline_script(baseline),
                     "push": push_script(files, self.stack.name, baseline=baseline),
                     "confirm": confirm_script(files, self.stack.name)}
            d.mkdir(parents=True)
            for name, text in steps.items():
                (d / f"{name}.sh").write_text(text)
            # each step as its own `sh` (as each arrives on the host), all in one trip into the namespace
            run_all = " && ".join(f'sh "{d / name}.sh"' for name in steps)
            out = _run(self.in_ns("scratch", ["sh", "-c", f'{{ {run_all}; }} >&2 && {{ {kernelstate.SAVE_SH}; }}'],
                                  env)).stdout
            for host in hosts:
                self._expected[host] = kernelstate.read_saved(out)
        return self._expected

    def live_save(self, host: str) -> tuple[str, str]:
        """What kernelstate.SAVE_SH prints on the host, and the digest of its confirmed rules."""
        out = self.console(host, f'{kernelstate.SAVE_SH}; echo "#=digest"; '
                                 'cat "$ENCLAVE_STATE_DIR/confirmed/digest" 2>/dev/null; true').stdout
        saved, _, confirmed = out.partition("#=digest\n")
        return saved, confirmed.strip()

    def live_firewall(self, host: str) -> tuple[KernelState, str]:
        """The host's kernel state, and the digest of its confirmed rules."""
        saved, confirmed = self.live_save(host)
        return kernelstate.read_saved(saved), confirmed

    def prove_hosts(self) -> list[HostProof]:
        """EVERY host, whatever the probes sample: its live rules and sets (iptables-save, ip6tables-save,
        ipset save) equal the compiler's, and its confirmed digest is the compiled files' digest."""
        expected = self.expected_firewalls()

        saves: dict[str, str] = {}

        def prove(host: str) -> HostProof:
            saved, confirmed = self.live_save(host)
            saves[host] = saved
            live = kernelstate.read_saved(saved)
            want = digest(self.plan.files[host])
            problems = []
            if confirmed != want:
                problems.append(f"confirmed digest {confirmed or 'missing'}, compiled {want}")
            if live != expected[host]:
                diff = list(difflib.unified_diff(expected[host].render().splitlines(), live.render().splitlines(),
                                                 "compiled", "live",
                                                 n=0, lineterm=""))[2:]
                changed = [line for line in diff if not line.startswith("@@")]
                problems.append(f"{len(changed)} line(s) differ from the compiled rules: " + "; ".join(changed[:6]))
            return HostProof(host, not problems, "; ".join(problems) or f"rules, sets and digest {want} as compiled")

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            proofs = list(pool.map(prove, [h.name for h in self.hosts]))
        prover = Prover(self.policy, self.addresses)
        out = []
        for p in proofs:
            verified, problem = self.verify_live(prover, p.host, saves[p.host])
            out.append(HostProof(p.host, p.ok and not problem, "; ".join(x for x in (p.detail, verified) if x)))
        return out

    # ------------------------------------------------------------------------------ the verifier

    def verify_live(self, prover: Prover, host: str, saved: str) -> tuple[str, bool]:
        """The verifier's verdict on the host's live rules, each counterexample sent as a real packet:
        (what to report, whether the live rules differ from the policy)."""
        ipv4, _, rest = saved.partition("#=ipv6\n")
        ipv6, _, sets = rest.partition("#=sets\n")
        try:
            proof = prover.prove(HostText(host, ipv4, ipv6, sets, f"{host} (live)"))
        except (ParseError, VerifyError) as exc:
            return f"the verifier could not read the live rules: {exc}", True
        if proof.proved:
            return f"live rules proved equal to the policy for every packet ({proof.atoms} classes)", False
        sent = self.probe_counterexamples(host, proof.differences, rejects="-j REJECT" in saved)
        shown = [f"{d.describe()} -> sent: {what}" for d, what in sent]
        unsent = len(proof.differences) - len(sent)
        return (f"live rules NOT equal to the policy ({proof.disagreeing} of {proof.atoms} classes differ): "
                + "; ".join(shown) + (f"; {unsent} more counterexample(s) no lab namespace can send" if unsent else "")
                ), True

    def probe_counterexamples(self, host: str, differences: list[Difference],
                              rejects: bool) -> list[tuple[Difference, str]]:
        """Each counterexample a lab namespace can send (a NEW tcp, udp or ping packet arriving at `host` from
        an address a host with open egress or an outsider has on that link): sent by the probe agent, with what
        the kernel did.
        rejects: the host's live rules hold a REJECT (then a refusal may be the firewall's)."""
        senders: dict[tuple[AddressKind, int], str] = {}
        kinds: tuple[AddressKind, ...] = ("private", "public", "public6")
        for name in [*(h.name for h in self.hosts), *OUTSIDERS]:
            for each in kinds:
                link = self.link(name, each)
                if link is not None:
                    senders[(each, int(ipaddress.ip_address(link[1])))] = name
        # a host whose egress is restricted filters what it sends itself: its OUTPUT would decide too
        restricted = {h.name for h in self.hosts if self.policy.stack.roles[h.role].egress == "restricted"}
        probes: list[tuple[Difference, Probe]] = []
        for d in differences:
            p = d.packet
            if p.iface not in (self.interfaces.public, self.interfaces.private):
                continue  # lo, or an interface the host does not have
            kind: AddressKind = ("public6" if d.family == 6 else "public") if p.iface == self.interfaces.public else "private"
            source = senders.get((kind, p.src))
            if source in restricted:
                continue
            target = self.link(host, kind)
            echo = p.icmp == (8 if d.family == 4 else 128)
            port = (PortSpec("tcp" if p.proto == 6 else "udp", p.dport, p.dport) if p.proto in (6, 17) and p.dport
                    else PortSpec("icmp") if echo else None)
            if (d.hook != "INPUT" or "NEW" not in d.states or source is None or source == host or target is None
                    or int(ipaddress.ip_address(target[1])) != p.dst or port is None):
                continue
            self.ensure_neighbours(source, host, kind)
            probes.append((d, Probe(Endpoint("host", source), Target(host, kind, target[1]), port, None)))
            if len(probes) == PROBED_COUNTEREXAMPLES:
                break
        if not probes:
            return []
        through = {id(probe) for d, probe in probes if d.rules_accept}  # a slow answer to these gets a second try
        outcomes = send_probes({probe.source.name: str(self.agent_socket()) for _, probe in probes},
                               [probe for _, probe in probes], admitted=lambda probe: id(probe) in through)
        return [(d, what_the_kernel_did(o, d, rejects)) for (d, _), o in zip(probes, outcomes)]

    def ensure_neighbours(self, a: str, b: str, kind: AddressKind) -> None:
        """Permanent IPv4 neighbour entries between a and b on `kind` (a sampled lab gives them only to the
        pairs it probes; IPv6 resolves its neighbours itself)."""
        if kind == "public6":
            return
        la, lb = self.link(a, kind), self.link(b, kind)
        if la is None or lb is None:
            return
        for name, mine, theirs in ((a, la, lb), (b, lb, la)):
            _run(self.in_ns(name, ["ip", "neigh", "replace", theirs[1], "lladdr", theirs[2], "dev", mine[0],
                                   "nud", "permanent"]))


def what_the_kernel_did(outcome: Outcome, d: Difference, rejects: bool) -> str:
    """A counterexample's real packet, in words: admitted or dropped by the host's kernel, and whether that is
    what the verifier said its live rules do. The agent listens only on the stack's ports: a refusal from a
    host whose rules hold no REJECT is its TCP/UDP stack answering, so the packet was admitted."""
    detail = outcome.detail
    if outcome.passed:
        admitted: bool | None = True
        said = f"admitted ({detail})"
    elif detail.startswith("refused") and not rejects:
        admitted = True
        said = "admitted (refused by the host itself: nothing listens on that port, and its rules hold no REJECT)"
    elif detail.startswith("refused"):
        admitted = None
        said = f"{detail}: a REJECT or the host itself, the packet cannot tell"
    elif detail.startswith("timeout"):
        admitted = False
        said = f"dropped ({detail})"
    else:
        admitted = None
        said = f"not sent by the source's kernel ({detail})"
    if admitted is None:
        return said
    return said + (", as the verifier said" if admitted == d.rules_accept else ", NOT as the verifier said")
