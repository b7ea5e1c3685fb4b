"""A private Open vSwitch: its own ovsdb-server and ovs-vswitchd, for demos and tests.

Everything lives in a run directory of its own (database made with ovsdb-tool
from the installed schema, the database's unix socket, control sockets,
pidfiles; logs there too unless `log_dir` says otherwise), and every
ovs-vsctl/ovs-appctl call names those sockets explicitly, so a system Open
vSwitch (/var/run/openvswitch, /etc/openvswitch) is never read nor touched::

    with Topology() as topo, UserspaceSwitch(netns=topo.add_netns("host")) as sw:
        br = sw.add_bridge("br0")                       # datapath_type=netdev
        sw.add_port(br, "p1")

The daemons are children of this process (no --detach): `stop()` (also on
`with` exit, on any exception, and at interpreter exit as a safety net) asks
ovs-vswitchd to exit, then kills by pid what is still running, and reaps
both. They are started in a session of their own, so a Ctrl-C at the terminal
reaches this process only and the teardown runs in order; and with
PR_SET_PDEATHSIG, so they die with the thread that started them if that one is
killed outright (SIGKILL) and never ran its cleanup.

``netns``: ovs-vswitchd runs inside that `ip netns` namespace (``ip netns exec``).
The userspace datapath (``netdev``) reaches its ports through packet sockets
and netlink of its own namespace, so ports must live there; the kernel
datapath (``system``, the openvswitch module) is per namespace too: inside a
namespace of our own it is invisible to (and cannot clash with) a system
instance, and it vanishes with that namespace.

Userspace datapath on veth ports: packets are read with packet sockets as the
kernel left them; a TCP or UDP packet whose checksum was left to "hardware"
(TX checksum offload, CHECKSUM_PARTIAL) crosses the switch with a wrong one and
is dropped by the receiver. Turn TX offloads off on both ends of every veth
(`Topology.disable_offloads`).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from vnet.errors import UnsupportedError, VnetError

__all__ = ["OvsError", "UserspaceSwitch", "SCHEMA", "ovs_available"]

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
DAEMONS = ("ovsdb-server", "ovs-vswitchd")
TOOLS = ("ovsdb-tool", "ovs-vsctl", "ovs-appctl")
PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child


class OvsError(VnetError):
    """An Open vSwitch daemon or tool failed; the message carries its stderr or log."""

    exit_code = 7


def ovs_available() -> str | None:
    """None when Open vSwitch's programs and schema are installed, else what is missing."""
    missing = [p for p in DAEMONS + TOOLS if shutil.which(p) is None]
    if not SCHEMA.exists():
        missing.append(str(SCHEMA))
    return ", ".join(missing) or None


def running_daemons() -> set[int]:
    """The pids of live (not zombie) ovsdb-server / ovs-vswitchd processes, whoever started them."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                comm, rest = f.read().rsplit(")", 1)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if comm.split("(", 1)[1] in ("ovsdb-server", "ovs-vswitchd") and rest.split()[0] != "Z":
            found.add(int(pid))
    return found


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class UserspaceSwitch:
    """ovsdb-server + ovs-vswitchd from a private run directory; a context manager.

    run_dir: where the database, sockets and pidfiles go (default: a fresh
    directory under /tmp, removed by `stop()`; a unix socket path must stay
    under 108 bytes). log_dir: where the daemons' logs go (default run_dir;
    give one that outlives the switch to keep them). netns: the `ip netns`
    namespace ovs-vswitchd runs in (None: this process's). timeout: seconds
    for each start, ovs-vsctl call and stop.
    """

    def __init__(self, *, netns: str | None = None, run_dir: str | os.PathLike | None = None,
                 log_dir: str | os.PathLike | None = None, datapath_type: str = "netdev",
                 timeout: float = 30.0) -> None:
        self.netns = netns
        self.datapath_type = datapath_type
        self.timeout = timeout
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._procs: dict[str, subprocess.Popen] = {}
        self._outputs: list[Any] = []
        self.bridges: list[str] = []
        self._started = False
        self._stopped = False
        self._pid = os.getpid()
        self._lock = threading.Lock()

    # -- paths --

    @property
    def db_socket(self) -> Path:
        return self.run_dir / "db.sock"

    @property
    def db(self) -> str:
        """The --db argument of every ovs-vsctl call."""
        return f"unix:{self.db_socket}"

    def ctl(self, daemon: str) -> Path:
        """The unixctl socket of `daemon` (for ovs-appctl -t)."""
        return self.run_dir / f"{daemon}.ctl"

    def log(self, daemon: str) -> Path:
        return (self.log_dir or self.run_dir) / f"{daemon}.log"

    @property
    def pids(self) -> dict[str, int]:
        """The daemons' process ids (while running)."""
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Defaults of every OVS program that would otherwise point at the system instance.
        for var in ("OVS_RUNDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"):
            env[var] = str(self.run_dir)
        env["OVS_LOGDIR"] = str(self.log_dir or self.run_dir)
        return env

    # -- lifecycle --

    def __enter__(self) -> UserspaceSwitch:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> UserspaceSwitch:
        """Create the database and start both daemons; waits until ovs-vswitchd has
        connected to the database. On any failure everything started is stopped."""
        if self._started:
            raise OvsError("this switch was started already")
        missing = ovs_available()
        if missing:
            raise UnsupportedError(f"Open vSwitch is not installed (missing {missing})",
                                   hint="apt-get install openvswitch-switch (make deps does)")
        self._started = True
        atexit.register(self.stop)
        try:
            if self.run_dir is None:
                self.run_dir = Path(tempfile.mkdtemp(prefix="vnet-ovs-"))
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
            if len(str(self.db_socket)) > 100:
                raise OvsError(f"run directory {self.run_dir} is too long for a unix socket path")
            db_file = self.run_dir / "conf.db"
            self._run(["ovsdb-tool", "create", str(db_file), str(SCHEMA)])
            self._spawn("ovsdb-server", [
                "ovsdb-server", str(db_file), f"--remote=punix:{self.db_socket}",
                f"--unixctl={self.ctl('ovsdb-server')}", f"--pidfile={self.run_dir / 'ovsdb-server.pid'}",
                f"--log-file={self.log('ovsdb-server')}", "--no-chdir"])
            self._wait_for(lambda: self.db_socket.exists(), "ovsdb-server", "its socket")
            self.vsctl("--no-wait", "init")
            argv = ["ovs-vswitchd", self.db, f"--unixctl={self.ctl('ovs-vswitchd')}",
                    f"--pidfile={self.run_dir / 'ovs-vswitchd.pid'}", f"--log-file={self.log('ovs-vswitchd')}",
                    "--no-chdir"]
            if self.netns is not None:
                argv = ["ip", "netns", "exec", self.netns, *argv]  # ip execs it: same pid
            self._spawn("ovs-vswitchd", argv)
            self._wait_for(lambda: self.ctl("ovs-vswitchd").exists(), "ovs-vswitchd", "its control socket")
            # A wait-for-reconfigure no-op: returns once ovs-vswitchd has read the database.
            self.vsctl("set", "Open_vSwitch", ".", "external_ids:vnet=1")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.run_dir / f"{name}.out", "wb")  # early failures, before the log file is open
        self._outputs.append(out)
        self._procs[name] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self._env(),
            start_new_session=True, preexec_fn=_die_with_parent, close_fds=True)

    def _wait_for(self, ready, name: str, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not ready():
            proc = self._procs[name]
            if proc.poll() is not None:
                raise OvsError(f"{name} exited {proc.returncode} at start: {self._tail(name)}")
            if time.monotonic() > deadline:
                raise OvsError(f"{name} did not create {what} within {self.timeout:g} s: {self._tail(name)}")
            time.sleep(0.02)

    def _tail(self, name: str, lines: int = 5) -> str:
        text = ""
        for f in (self.log(name), self.run_dir / f"{name}.out"):
            try:
                text += f.read_text(errors="replace")
            except OSError:
                pass
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"

    def running(self) -> bool:
        return any(p.poll() is None for p in self._procs.values())

    def stop(self) -> None:
        """Stop both daemons and reap them; idempotent, never raises for a daemon
        that is gone already. Kernel datapath: bridges are deleted first, so no
        datapath port is left behind."""
        with self._lock:
            if self._stopped or not self._started or os.getpid() != self._pid:
                return
            self._stopped = True
        atexit.unregister(self.stop)
        try:
            vswitchd = self._procs.get("ovs-vswitchd")
            if vswitchd is not None and vswitchd.poll() is None:
                if self.bridges and self.datapath_type != "netdev":
                    self._run(["ovs-vsctl", f"--db={self.db}", f"--timeout={max(1, int(self.timeout / 3))}",
                               *[a for br in self.bridges for a in ("--", "--if-exists", "del-br", br)]],
                              check=False)
                # --cleanup: also release the datapath (kernel: delete it and its ports).
                self._run(["ovs-appctl", "-t", str(self.ctl("ovs-vswitchd")), "--timeout=5", "exit", "--cleanup"],
                          check=False)
            for name, grace in (("ovs-vswitchd", self.timeout / 3), ("ovsdb-server", 0.0)):
                proc = self._procs.get(name)
                if proc is not None:
                    _terminate(proc, grace)
        finally:
            for out in self._outputs:
                out.close()
            self._outputs.clear()
            if self._own_run_dir and self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- configuration --

    def _run(self, argv: Sequence[str], check: bool = True, timeout: float | None = None) -> str:
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True, env=self._env(),
                                  timeout=timeout or self.timeout + 5, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            if check:
                raise OvsError(f"{' '.join(argv)}: no answer within {timeout or self.timeout + 5:g} s") from None
            return ""
        if check and proc.returncode != 0:
            raise OvsError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def vsctl(self, *args: str) -> str:
        """ovs-vsctl against this instance's database (waits for ovs-vswitchd to
        apply the change unless --no-wait is among args); returns stdout."""
        self._check_running()
        return self._run(["ovs-vsctl", f"--db={self.db}", f"--timeout={int(self.timeout)}", *args])

    def appctl(self, *args: str, daemon: str = "ovs-vswitchd") -> str:
        """ovs-appctl to one of this instance's daemons; returns stdout."""
        self._check_running()
        return self._run(["ovs-appctl", "-t", str(self.ctl(daemon)), f"--timeout={int(self.timeout)}", *args])

    def _check_running(self) -> None:
        if not self._started or self._stopped:
            raise OvsError("the switch is not running")
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise OvsError(f"{name} exited {proc.returncode}: {self._tail(name)}")

    def add_bridge(self, name: str, datapath_type: str | None = None) -> str:
        """A bridge (normal MAC-learning switch, no controller) on this instance's
        datapath type; returns its name."""
        dp = datapath_type or self.datapath_type
        self.bridges.append(name)
        self.vsctl("add-br", name, "--", "set", "bridge", name, f"datapath_type={dp}")
        return name

    def add_port(self, bridge: str, port: str, *, keep_qdisc: bool = True) -> None:
        """Add interface `port` (in ovs-vswitchd's namespace) to `bridge`. keep_qdisc:
        a QoS record of type linux-noop, so Open vSwitch never replaces the port's
        Linux qdisc (a tbf/htb added by the caller stays as it is)."""
        args = ["add-port", bridge, port]
        if keep_qdisc:
            args += ["--", "set", "port", port, "qos=@noop", "--", "--id=@noop", "create", "qos", "type=linux-noop"]
        self.vsctl(*args)

    def dump_flows(self) -> str:
        """The datapath's flows (ovs-appctl dpctl/dump-flows)."""
        return self.appctl("dpctl/dump-flows")


def _terminate(proc: subprocess.Popen, grace: float) -> None:
    """Give `proc` `grace` seconds to exit by itself, then SIGTERM, then SIGKILL; reap it."""
    for sig, wait in ((None, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None and proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
