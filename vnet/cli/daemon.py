"""`vnet agent` serving, without typer: the long-running agent is started from here
(vnet.cli.main) with argparse, so that typer's parse (a pydantic adapter per option)
and the modules it imports never become part of its resident memory. `vnet agent
init`, --help and any command line this parser does not take go to typer as before."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from .common import setup_logging

DEFAULT_KEY = Path("/etc/vnet/key")
DEFAULT_AGENT = "127.0.0.1:7878"
DEFAULT_COLLECTOR = "127.0.0.1:7879"


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


def writable_dir(path: Path, what: str) -> Path:
    """`path` as a folder this process can write in, made if missing; else one UsageError
    now, not a failure at the first chunk of a trace (the spool is written only once the
    memory queue is full)."""
    import os
    import tempfile

    from vnet.errors import UsageError

    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # access() is not enough: read-only mounts, full disks
    except OSError as e:
        raise UsageError(f"{what} {path} is not a writable directory: {e.strerror or e}",
                         hint=f"give another {what.split()[0]} folder" if os.geteuid() == 0 else
                         "run as a user that can write there") from None
    return path


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


def _run_agent(listen: str, key: Path, allow_remote: bool, spool: Path, host: Optional[str], queue_mb: int,
               spool_mb: int, verbose: int, pin_dir: Optional[Path] = None, orphan_grace: float = 60.0,
               queue_dir: Optional[Path] = Path("/dev/shm/vnet")) -> None:
    setup_logging(verbose, least=1)
    from vnet.agent.agent import Agent
    from vnet.probes import features
    from vnet.protocol import load_key
    from vnet.protocol.server import Server

    features.require_privileges(net_admin=True)
    writable_dir(spool, "--spool")
    _one_malloc_arena()
    secret = load_key(key)
    # The address first: bad input is refused in one line before the agent starts (resending what
    # a dead agent left, naming leftovers); nobody is served before _serve, so the handler may wait.
    agent_obj = None
    server = Server(listen, secret, "agent", lambda ch: agent_obj.handle(ch), allow_remote=allow_remote)
    try:
        agent_obj = Agent(secret, spool, host, queue_bytes=queue_mb << 20, spool_bytes=spool_mb << 20,
                          pin_dir=pin_dir, orphan_grace=orphan_grace, queue_dir=queue_dir)
    except BaseException:
        server.stop()
        server.serve()  # stopped before it began: closes the socket and removes a unix socket's file
        raise
    try:
        _serve(server, "agent")
    finally:
        agent_obj.shutdown()  # a trace still running is stopped and detached before we exit


def agent_fast(argv: list[str]) -> int | None:
    """`vnet agent [OPTIONS]` (serving; not `init`, not --help) parsed with argparse:
    typer's parse builds a pydantic adapter per option, and what that imports and
    allocates stays resident in the long-running agent (~9 MiB of its VmRSS,
    tools/bench/first_event.py). The same options, defaults and exit codes.
    None: not this command line (typer takes it, and says what is wrong with it)."""
    if argv[:1] != ["agent"] or any(a in ("init", "--help", "-h") for a in argv[1:]):
        return None
    import argparse

    class Quiet(argparse.ArgumentParser):
        def error(self, message):  # typer takes the command line and says what is wrong, once
            raise SystemExit(2)

    ap = Quiet(prog="vnet agent", add_help=False)
    ap.add_argument("--listen", default=DEFAULT_AGENT)
    ap.add_argument("--key", type=Path, default=DEFAULT_KEY)
    ap.add_argument("--allow-remote", action="store_true")
    ap.add_argument("--spool", type=Path, default=Path("/var/lib/vnet/spool"))
    ap.add_argument("--host", default=None)
    ap.add_argument("--queue-mb", type=int, default=64)
    ap.add_argument("--spool-mb", type=int, default=1024)
    ap.add_argument("--pin-dir", type=Path, default=None)
    ap.add_argument("--queue-dir", type=Path, default=Path("/dev/shm/vnet"))
    ap.add_argument("--orphan-grace", type=float, default=60.0)
    ap.add_argument("-v", "--verbose", action="count", default=0)
    try:
        args = ap.parse_args(argv[1:])
    except SystemExit:
        return None  # typer says what is wrong, as it would have
    if args.queue_mb < 0 or args.spool_mb < 0 or not 0 <= args.orphan_grace <= 86400:
        return None
    from .common import cli_errors

    try:  # the boundary typer's path has: one line and its code, a bug's traceback only with -v
        cli_errors(_run_agent)(args.listen, args.key, args.allow_remote, args.spool, args.host, args.queue_mb,
                               args.spool_mb, args.verbose, args.pin_dir, args.orphan_grace, args.queue_dir)
    except SystemExit as e:
        return e.code
    return 0
