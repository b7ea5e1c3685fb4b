"""Entry point: `vnet` (console script) and `python -m vnet`.

`vnet trace` with a command line the fast parser is sure of runs without importing typer (and
pydantic, which typer 0.29 builds an adapter per option with): ~0.13 s less to the first event;
`vnet agent` serving likewise (vnet/cli/daemon.py: what typer's parse allocates would stay
resident in the long-running agent). Everything else, `--help` and every command line the fast
parsers decline included, goes to the typer application (vnet.cli.app), its usage errors made
one line (`vnet: error: ...`).
"""

from __future__ import annotations

import sys


def _fast_trace(args: list[str]) -> bool:
    """Run `vnet trace ARGS` without typer, as typer's standalone mode would; False: not sure of ARGS."""
    from . import trace as trace_cmd
    from .common import setup_logging
    from .params import FastParser

    kwargs = FastParser(trace_cmd.trace).parse(args)
    if kwargs is None:
        return False
    setup_logging(0)  # what the root callback does for `vnet trace` (no -v before the command)
    try:
        trace_cmd.trace(**kwargs)  # a VnetError is one stderr line + SystemExit(code), as under typer
    except KeyboardInterrupt:
        sys.exit(130)  # typer: Exit(130), nothing printed
    except EOFError:
        print(file=sys.stderr)  # typer: Abort, its abort message, exit 1
        try:
            from typer.rich_utils import rich_abort_error

            rich_abort_error()
        except ImportError:
            print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        import errno

        if e.errno != errno.EPIPE:
            raise
        from typer._click.utils import PacifyFlushWrapper

        sys.stdout = PacifyFlushWrapper(sys.stdout)
        sys.stderr = PacifyFlushWrapper(sys.stderr)
        sys.exit(1)
    return True


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["trace"] and _fast_trace(args[1:]):
        return
    from .daemon import agent_fast

    code = agent_fast(args)  # the long-running agent without typer's parse (vnet/cli/daemon.py)
    if code is not None:
        sys.exit(code)
    from .app import app

    sys.exit(_run_app(app))


def _run_app(app) -> int:
    """The typer application, with its usage errors as one line (`vnet: error: ...`, exit 2)
    instead of click's usage block; everything else as typer's standalone mode does it."""
    import typer
    from typer._click import exceptions as click_exc

    try:
        result = app(standalone_mode=False)
    except click_exc.NoArgsIsHelpError:
        app()  # `vnet` alone: the help, as typer prints it
        return 0
    except click_exc.UsageError as e:
        cmd = e.ctx.command_path.replace("python -m ", "").strip() if e.ctx is not None else "vnet"
        print(f"vnet: error: {e.format_message()} (see '{cmd} --help')", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("vnet: interrupted", file=sys.stderr)
        return 130
    except click_exc.ClickException as e:  # other click errors: still one line
        print(f"vnet: error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    main()
