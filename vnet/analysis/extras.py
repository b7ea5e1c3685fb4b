"""The `analysis` extra (numpy, matplotlib, perfetto, pyarrow): agents and
tracing never need it, so a host that only traces stays small. What needs it
says so, with the command that installs it."""

from __future__ import annotations

import importlib

from vnet.errors import UnsupportedError

EXTRA = "pip install 'vnet[analysis]'"


def require(module: str, what: str):
    """Import an optional dependency, or raise "WHAT needs PACKAGE: pip install ..." (exit 5)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise UnsupportedError(f"{what} needs the Python package {top!r}, which is not installed: "
                               f"{EXTRA}") from None
