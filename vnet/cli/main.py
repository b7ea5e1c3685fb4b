"""Entry point: `vnet` (console script) and `python -m vnet`."""

from __future__ import annotations

from typing import Optional

import typer

import vnet

from . import analyze as analyze_cmd
from . import demo as demo_cmd
from . import doctor as doctor_cmd
from . import export as export_cmd
from . import probes as probes_cmd
from . import serve as serve_cmd
from . import spec as spec_cmd
from . import trace as trace_cmd
from .common import setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="vnet: programmable packet tracer for virtualized networks.")


def _version(value: bool) -> None:
    if value:
        from vnet.binding import libbpf

        try:
            lib = f"libbpf {libbpf.version()}"
        except Exception as e:  # --version must work even where libbpf is missing
            lib = f"libbpf unavailable: {e}"
        typer.echo(f"vnet {vnet.__version__} ({lib})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="More detail on stderr."),
):
    setup_logging(verbose)


app.command("trace")(trace_cmd.trace)
app.command("demo")(demo_cmd.demo)
app.command("doctor")(doctor_cmd.doctor)
app.command("probes")(probes_cmd.probes)
app.add_typer(spec_cmd.app, name="spec")
app.add_typer(serve_cmd.agent_app, name="agent")
app.command("collect")(serve_cmd.collect)
app.command("dispatch")(serve_cmd.dispatch)
app.command("analyze")(analyze_cmd.analyze)
app.command("export")(export_cmd.export)


def main() -> None:
    import sys

    from .daemon import agent_fast

    code = agent_fast(sys.argv[1:])  # the long-running agent without typer's parse
    if code is not None:
        sys.exit(code)
    app()


if __name__ == "__main__":
    main()
