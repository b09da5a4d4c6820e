"""The lab on stock droplet images: every host starts without `ipset` (as every stock image does), boots as
cloud-init boots it (bootcmd, sshd, then runcmd's install from the pretend mirror) and takes its first push
through the real `python -m enclave.pushrun`, OpenSSH and sshd; a host whose install is impossible stays closed
and reachable, and its push names what is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from config.stackfile import Stack
from enclave.lab.lab import Lab

from ..conftest import leftovers
from .stock_image import installed, make_view, prefix

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("sshd") or not shutil.which("ipset"),
    reason="the lab needs root, sshd and ipset (make setup as root installs them)",
)


def stock_lab(stack: Stack, root: Path, mirror: dict[str, str]) -> tuple[Lab, dict[str, Path]]:
    """A lab whose hosts run on stock images (their /usr/sbin views), each mirror up unless `mirror` says."""
    views = {h.name: make_view(root / h.name, ("ipset",), mirror.get(h.name, "up")) for h in Lab(stack).hosts}
    return Lab(stack, host_wrapper={h: prefix(v) for h, v in views.items()}), views


def test_stock_images_install_ipset_at_first_boot_and_take_their_first_push(dev6: Stack, tmp_path: Path) -> None:
    lab, views = stock_lab(dev6, tmp_path, {})
    with lab:
        try:
            assert not lab.install_failures, lab.install_failures
            assert all(installed(v, "ipset") for v in views.values())
            failures = lab.push_all()
            assert not failures, [str(f) for f in failures.values()]
            report = lab.probe()
            assert report.ok, "\n".join(o.describe() for o in report.mismatches)
        finally:
            run_id = lab.run_id
    assert not leftovers(run_id)


def test_without_a_mirror_the_host_stays_closed_and_reachable_and_its_push_names_ipset(dev6: Stack, tmp_path: Path) -> None:
    lab, _ = stock_lab(dev6, tmp_path, {"mysql-1": "down"})
    with lab:
        assert set(lab.install_failures) == {"mysql-1"}
        assert "ipset (package ipset)" in lab.install_failures["mysql-1"]
        failures = lab.push_all()
        assert set(failures) == {"mysql-1"}, [str(f) for f in failures.values()]
        assert failures["mysql-1"].step == "push"
        assert "ipset (package ipset)" in str(failures["mysql-1"]) and "nothing was changed" in str(failures["mysql-1"])
        # closed on its baseline, and a new SSH connection through the bastion still gets in
        assert lab.ssh("mysql-1", "cat \"$ENCLAVE_STATE_DIR/in-force\"").returncode == 0
        assert "baseline: ssh from the VPC" in lab.run("mysql-1", ["iptables", "-S", "ENCLAVE-INPUT"]).stdout
    assert not leftovers(lab.run_id)
