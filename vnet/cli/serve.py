"""`vnet agent` and `vnet collect`: the long-running sides of a distributed trace."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import cli_errors, setup_logging

from .daemon import DEFAULT_AGENT, DEFAULT_COLLECTOR, DEFAULT_KEY, _run_agent, _serve, writable_dir

agent_app = typer.Typer(help="Run traces on this host for a dispatcher; ship the data to a collector.",
                        invoke_without_command=True, no_args_is_help=False)


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
    queue_dir: Path = typer.Option(Path("/dev/shm/vnet"), "--queue-dir", help="A folder on tmpfs for the memory "
                                   "queue (one mapped file per trace): it outlives a killed agent, whose "
                                   "successor sends it. Unusable: the queue is in the agent's heap (a kill "
                                   "loses it, counted)."),
    pin_dir: Optional[Path] = typer.Option(None, "--pin-dir", help="A folder on bpffs where each trace's kernel "
                                           "counters outlive a killed agent (default /sys/fs/bpf/vnet)."),
    orphan_grace: float = typer.Option(60.0, "--orphan-grace", min=0, max=86400, metavar="SECONDS",
                                       help="A trace whose dispatcher is cut off (not one that exits) runs on this "
                                       "long for it to come back and resume it, then stops; 0: stop at once."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True),
):
    """Serve dispatchers: run the traces they start, ship raw events to the collector."""
    if ctx.invoked_subcommand is not None:
        return
    _run_agent(listen, key, allow_remote, spool, host, queue_mb, spool_mb, verbose, pin_dir, orphan_grace, queue_dir)


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
    max_streams: int = typer.Option(256, "--max-streams", min=1, help="Streams open at once (each holds a "
                                    "file open; one per trace, host and run not yet ended); past it new ones are "
                                    "refused and their agents retry."),
    direct_io: bool = typer.Option(True, "--direct-io/--page-cache", help="Write whole blocks around the page "
                                   "cache (O_DIRECT): far less CPU per event, each write waits for the device. "
                                   "--page-cache: plain writes, memory absorbs bursts a slow disk cannot take. "
                                   "File systems without direct I/O get plain writes either way."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True),
):
    """Receive raw event chunks from agents and write them to per-trace, per-host files."""
    setup_logging(verbose, least=1)
    from vnet.collector.server import Collector
    from vnet.protocol import MAX_DATA_BYTES, load_key
    from vnet.protocol.server import Server

    collector = Collector(writable_dir(out, "--out"), rotate_bytes=rotate_mb << 20 if rotate_mb else None,
                          max_streams=max_streams, direct_io=direct_io)
    try:
        _serve(Server(listen, load_key(key), "collector", collector.handle, allow_remote=allow_remote,
                      limit=MAX_DATA_BYTES), "collector")
    finally:
        for line in collector.close():  # per stream: what was written, and what could not be
            print(f"vnet: collector: {line}", file=sys.stderr, flush=True)


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
    import logging

    verbose = max(verbose, getattr(logging.getLogger("vnet"), "_vnet_verbose", 0))  # `vnet -v dispatch` too
    from vnet.dispatch import load
    from vnet.dispatch.dispatcher import Dispatcher, HostRun
    from vnet.protocol import load_key

    spec = load(spec_file)
    packages = spec.control_packages()
    hosts = [HostRun(h.name, h.agent, packages[h.name]) for h in spec.hosts]
    key_path = key or (Path(spec.collector.key) if spec.collector.key else DEFAULT_KEY)
    d = Dispatcher(hosts, load_key(key_path), strict=strict or spec.strict)
    d.verbose = bool(verbose)
    if not verbose:
        d.hold()  # said once every host traces; a run that fails before prints its error only
    d.say(f"vnet: trace {spec.name}: {len(hosts)} hosts, collector {spec.collector.address}")
    summary = d.run(spec.duration_s, spec.count, live=not quiet and sys.stderr.isatty(), hold=not verbose)
    if json_out:
        import json

        print(json.dumps(summary, default=str))
    failure = Dispatcher.outcome(summary)  # 13: a host lost mid-trace; 4: a host with nothing left
    if failure is not None:
        raise failure
