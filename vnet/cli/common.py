"""What every command shares: the error boundary and logging set-up."""

from __future__ import annotations

import functools
import logging
import sys

from vnet.errors import VnetError


def setup_logging(verbose: int, least: int = 0) -> None:
    """Quiet by default (errors reach the user as one line from the exception);
    -v: vnet's steps and libbpf's messages; -vv: debug, including libbpf's.
    `least`: a level to log at anyway (the agent and collector log their peers), which
    does not count as -v for a bug's traceback."""
    root = logging.getLogger("vnet")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vnet: %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    if verbose <= 0 and getattr(root, "_vnet_verbose", 0) > 0:
        return  # `vnet -v trace` then the command's own default: keep the louder one
    root._vnet_verbose = verbose
    level = max(verbose, least)
    root.setLevel(logging.DEBUG if level >= 2 else logging.INFO if level == 1 else logging.WARNING)
    logging.getLogger("vnet.libbpf").setLevel(logging.DEBUG if level >= 2 else
                                              logging.INFO if level == 1 else logging.CRITICAL)


def fail(err: VnetError) -> SystemExit:
    """One line on stderr, a distinct exit code. SystemExit, not typer.Exit: typer lets it through
    unchanged (its standalone mode turns an Exit into the same sys.exit), and `vnet trace`'s fast
    path (vnet.cli.main) runs commands without importing typer."""
    print(f"vnet: error: {err}", file=sys.stderr)
    return SystemExit(err.exit_code)


INTERNAL_ERROR = 70   # EX_SOFTWARE: a bug in vnet, not the user's input


def cli_errors(fn):
    """Turn a VnetError raised anywhere below into one stderr line + its exit code; anything
    else is a bug: one line too (exit 70), the traceback only with -v (or VNET_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VnetError as e:
            raise fail(e) from None
        except KeyboardInterrupt:
            print("vnet: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as e:  # noqa: BLE001 - the error boundary
            if type(e).__module__.split(".")[0] in ("click", "typer"):
                raise  # the framework's own exits (typer.Exit, click.Abort)
            import os
            import traceback

            loud = getattr(logging.getLogger("vnet"), "_vnet_verbose", 0) > 0 or os.environ.get("VNET_DEBUG")
            if loud:
                traceback.print_exc()
            where = "the traceback is above" if loud else "run it again with -v for the traceback"
            print(f"vnet: internal error: {type(e).__name__}: {e} (a bug in vnet: {where}; please report it)",
                  file=sys.stderr)
            raise SystemExit(INTERNAL_ERROR) from None

    return wrapper
