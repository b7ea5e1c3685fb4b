"""Kernel tests create namespaces and load eBPF: they need root, and run whenever they have it."""

import os

import pytest


@pytest.fixture(autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel test needs root (network namespaces, eBPF); run: sudo make test-kernel")


@pytest.fixture
def need_ovs() -> None:
    """Open vSwitch's programs (make deps installs openvswitch-switch); a failure in CI."""
    from vnet.ovs import ovs_available

    missing = ovs_available()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"Open vSwitch not installed ({missing}); CI must have it (make deps)")
        pytest.skip(f"Open vSwitch not installed ({missing}): make deps installs openvswitch-switch")
