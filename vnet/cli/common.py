"""What every command shares: the error boundary and logging set-up."""

from __future__ import annotations

import functools
import logging
import sys

import typer

from vnet.errors import VnetError


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger("vnet")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vnet: %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, level) if verbose else level)
    # libbpf chatters at INFO; show it only from -vv.
    logging.getLogger("vnet.libbpf").setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def fail(err: VnetError) -> typer.Exit:
    """One line on stderr, a distinct exit code."""
    print(f"vnet: error: {err}", file=sys.stderr)
    return typer.Exit(err.exit_code)


def cli_errors(fn):
    """Turn a VnetError raised anywhere below into one stderr line + its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VnetError as e:
            raise fail(e) from None

    return wrapper
