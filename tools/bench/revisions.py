"""What the benchmarks share to run a --compare-to revision beside this tree."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def connect_for(code: Path):
    """`connect` of the vnet at `code`: an agent of a --compare-to revision speaks that
    revision's wire protocol (version 2 came with raw chunk records), so a benchmark
    talks to it with that revision's channel module."""
    if code == ROOT:
        from vnet.protocol import connect

        return connect
    name = f"_vnet_channel_{abs(hash(str(code)))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, code / "vnet" / "protocol" / "channel.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].connect
