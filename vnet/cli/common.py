"""What every command shares: the error boundary and logging set-up."""

from __future__ import annotations

import functools
import logging
import sys

from vnet.errors import VnetError


def setup_logging(verbose: int) -> None:
    """Quiet by default (errors reach the user as one line from the exception);
    -v: vnet's steps and libbpf's messages; -vv: debug, including libbpf's."""
    root = logging.getLogger("vnet")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vnet: %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    if verbose <= 0 and getattr(root, "_vnet_verbose", 0) > 0:
        return  # `vnet -v trace` then the command's own default: keep the louder one
    root._vnet_verbose = verbose
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)
    logging.getLogger("vnet.libbpf").setLevel(logging.DEBUG if verbose >= 2 else
                                              logging.INFO if verbose == 1 else logging.CRITICAL)


def fail(err: VnetError) -> "typer.Exit":  # noqa: F821 - typer is imported when a command fails
    """One line on stderr, a distinct exit code."""
    import typer

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
