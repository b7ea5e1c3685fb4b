"""Kernel tests create namespaces and load eBPF: they need root, and run whenever they have it."""

import os

import pytest


@pytest.fixture(autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel test needs root (network namespaces, eBPF); run: sudo make test-kernel")
