"""Every host's proof from its kernel: its live rules, sets and confirmed digest equal what the compiled files
give a clean kernel. Both sides are read by enclave.kernelstate, the reader `enclave audit` compares with."""

from __future__ import annotations

import concurrent.futures
import difflib

from .. import kernelstate
from ..kernelstate import KernelState
from ..push import baseline_script, confirm_script, digest, push_script
from ..render import baseline_files
from .base import LabBase
from .hosts import WIPE_KERNEL_STATE
from .machine import _run
from .probe import HostProof

from .probe import HostProof


def _without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


class Proofs(LabBase):
    """What each host's kernel holds, and what it must hold."""

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

    def live_firewall(self, host: str) -> tuple[KernelState, str]:
        """The host's kernel state, and the digest of its confirmed rules."""
        out = self.console(host, f'{kernelstate.SAVE_SH}; echo "#=digest"; '
                                 'cat "$ENCLAVE_STATE_DIR/confirmed/digest" 2>/dev/null; true').stdout
        saved, _, confirmed = out.partition("#=digest\n")
        return kernelstate.read_saved(saved), confirmed.strip()

    def prove_hosts(self) -> list[HostProof]:
        """EVERY host, whatever the probes sample: its live rules and sets (iptables-save, ip6tables-save,
        ipset save) equal the compiler's, and its confirmed digest is the compiled files' digest."""
        expected = self.expected_firewalls()

        def prove(host: str) -> HostProof:
            live, confirmed = self.live_firewall(host)
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
            return list(pool.map(prove, [h.name for h in self.hosts]))
