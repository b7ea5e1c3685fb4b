"""tests/vmimage: build a minimal Debian image with the vnet wheel in it and trace
inside it under qemu (tools/vm/minimal_image.sh, tools/vm/run_minimal_image.py).
Needs root; VNET_SKIP_VM=1 skips it like the VM suite."""

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "vmimage: boots the minimal Debian image with vnet installed under qemu")


# Module scope: set up before the module-scoped wheel/image/guest fixtures, so nothing is
# built when the test is skipped.
@pytest.fixture(autouse=True, scope="module")
def _require_root_and_vm() -> None:
    if os.environ.get("VNET_SKIP_VM") == "1":
        pytest.skip("VNET_SKIP_VM=1: the minimal-image VM test was not run")
    if os.geteuid() != 0:
        pytest.skip("the minimal-image test needs root (debootstrap, chroot, qemu); run: sudo make test")
