"""`vnet agent` and `vnet collect`: the long-running sides of a distributed trace."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from .common import cli_errors, setup_logging

DEFAULT_KEY = Path("/etc/vnet/key")
DEFAULT_AGENT = "127.0.0.1:7878"
DEFAULT_COLLECTOR = "127.0.0.1:7879"

agent_app = typer.Typer(help="Run traces on this host for a dispatcher; ship the data to a collector.",
                        invoke_without_command=True, no_args_is_help=False)


def _serve(server, what: str) -> None:
    """Until SIGINT/SIGTERM; the server thread stops, peers' handlers clean up."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve, name=what, daemon=True)
    thread.start()
    print(f"vnet: {what} listening on {server.address}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.2) and thread.is_alive():
            pass
    finally:
        server.stop()
        thread.join(timeout=5)
        for s, h in previous.items():
            signal.signal(s, h)


def _one_malloc_arena() -> None:
    """glibc gives every thread that allocates its own malloc arena, and an arena keeps
    the high water of what was once parsed in it (libbpf reads the kernel's BTF for every
    object it loads): the agent's threads (one per connection, the drain, the shipper)
    share one instead. 17 MiB less resident after a hello (tools/bench/first_event.py);
    the GIL serializes them anyway. Where mallopt is not glibc's, nothing changes."""
    import ctypes

    M_ARENA_MAX = -8
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


@agent_app.callback()
@cli_errors
def agent(
    ctx: typer.Context,
    listen: str = typer.Option(DEFAULT_AGENT, "--listen", metavar="ADDR",
                               help="HOST:PORT or unix:/PATH. TCP: loopback unless --allow-remote."),
    key: Path = typer.Option(DEFAULT_KEY, "--key", help="Pre-shared key file (vnet agent init)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Listen on a non-loopback address."),
    spool: Path = typer.Option(Path("/var/lib/vnet/spool"), "--spool", help="Where chunks wait while the "
                               "collector is unreachable."),
    host: Optional[str] = typer.Option(None, "--host", help="This host's name in traces (default: hostname)."),
    queue_mb: int = typer.Option(64, "--queue-mb", min=0, help="Unacknowledged chunks kept in memory; "
                                 "beyond this they go to the spool."),
    spool_mb: int = typer.Option(1024, "--spool-mb", min=0, help="Disk spool bound; beyond it chunks are "
                                 "dropped and their events reported lost."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True),
):
    """Serve dispatchers: run the traces they start, ship raw events to the collector."""
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(max(verbose, 1))
    from vnet.agent.agent import Agent
    from vnet.probes import features
    from vnet.protocol import load_key
    from vnet.protocol.server import Server

    features.require_privileges(net_admin=True)
    _one_malloc_arena()
    agent_obj = Agent(load_key(key), spool, host, queue_bytes=queue_mb << 20, spool_bytes=spool_mb << 20)
    try:
        _serve(Server(listen, agent_obj.key, "agent", agent_obj.handle, allow_remote=allow_remote), "agent")
    finally:
        agent_obj.shutdown()  # a trace still running is stopped and detached before we exit


@agent_app.command("init")
@cli_errors
def agent_init(key: Path = typer.Option(DEFAULT_KEY, "--key", help="Where to write the key."),
               force: bool = typer.Option(False, "--force", help="Overwrite an existing key.")):
    """Create the pre-shared key (mode 0600). Copy it to every agent, collector and dispatcher host."""
    from vnet.protocol import new_key

    print(f"vnet: wrote a new key to {new_key(key, force)}", file=sys.stderr)


@cli_errors
def collect(
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the trace files (one folder per trace)."),
    listen: str = typer.Option(DEFAULT_COLLECTOR, "--listen", metavar="ADDR", help="HOST:PORT or unix:/PATH."),
    key: Path = typer.Option(DEFAULT_KEY, "--key", help="Pre-shared key file."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Listen on a non-loopback address."),
    rotate_mb: Optional[int] = typer.Option(None, "--rotate-mb", min=1, help="Start a new file after this size."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True),
):
    """Receive raw event chunks from agents and write them to per-trace, per-host files."""
    setup_logging(max(verbose, 1))
    from vnet.collector.server import Collector
    from vnet.protocol import MAX_DATA_BYTES, load_key
    from vnet.protocol.server import Server

    collector = Collector(out, rotate_bytes=rotate_mb << 20 if rotate_mb else None)
    try:
        _serve(Server(listen, load_key(key), "collector", collector.handle, allow_remote=allow_remote,
                      limit=MAX_DATA_BYTES), "collector")
    finally:
        collector.close()


@cli_errors
def dispatch(
    spec_file: Path = typer.Argument(..., metavar="SPEC", help="Trace spec (TOML; see examples/ and 'vnet spec check')."),
    key: Optional[Path] = typer.Option(None, "--key", help="Pre-shared key file (default: the spec's "
                                       "[collector] key, else /etc/vnet/key)."),
    strict: bool = typer.Option(False, "--strict", help="Fail if any host cannot run a requested probe."),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress line."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True),
):
    """Run a trace spec on every host it names: check, start together, show progress, stop, report losses."""
    setup_logging(verbose)
    from vnet.dispatch import load
    from vnet.dispatch.dispatcher import DispatchError, Dispatcher, HostRun
    from vnet.protocol import load_key

    spec = load(spec_file)
    packages = spec.control_packages()
    hosts = [HostRun(h.name, h.agent, packages[h.name]) for h in spec.hosts]
    key_path = key or (Path(spec.collector.key) if spec.collector.key else DEFAULT_KEY)
    d = Dispatcher(hosts, load_key(key_path), strict=strict or spec.strict)
    print(f"vnet: trace {spec.name}: {len(hosts)} hosts, collector {spec.collector.address}", file=sys.stderr)
    summary = d.run(spec.duration_s, spec.count, live=not quiet and sys.stderr.isatty())
    if json_out:
        import json

        print(json.dumps(summary, default=str))
    if summary["failed"]:
        raise typer.Exit(DispatchError.exit_code)
