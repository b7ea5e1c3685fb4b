"""The `vnet` command (console script and `python -m vnet`): `vnet agent` serving starts
without importing the typer application (vnet/cli/daemon.py); everything else is
vnet.cli.main's."""

from __future__ import annotations

import sys


def main() -> None:
    from .daemon import agent_fast

    code = agent_fast(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from .main import main as typer_main

    typer_main()
