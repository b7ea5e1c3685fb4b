"""tests/vmnet: a real second kernel as a host of a distributed trace: a 6.1
guest under qemu with a virtio NIC on a host tap, running its own `vnet agent`
(tools/vm/run_in_guest.py --net-tap). Needs root; VNET_SKIP_VM=1 skips it like
the VM suite."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))  # kernel_support


@pytest.fixture(autouse=True, scope="module")
def _require_root_and_vm() -> None:
    if os.environ.get("VNET_SKIP_VM") == "1":
        pytest.skip("VNET_SKIP_VM=1: the guest-agent test was not run")
    if os.geteuid() != 0:
        pytest.skip("the guest-agent test needs root (qemu, namespaces, eBPF); run: sudo make test")
