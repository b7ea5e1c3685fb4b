"""Shared by the tracing tests (test_trace.py, test_wheel.py): a two-namespace veth
topology, a `vnet` CLI process with its output streamed line by line, background
traffic, and the checks that nothing vnet loaded outlives its process.

Nothing is mocked: real namespaces, real eBPF, real packets, real processes.
Every wait is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vnet.topology import send_udp
from vnet.topology import veth_pair as _veth_pair

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^vnet: (\d+) events printed, (\d+) received, (\d+) lost \(ring buffer full\), "
                     r"(\d+) packets seen at (\d+) hooks$")
VNET_TC_HANDLE = 0x766E
VNET_PROG_PREFIX = "vnet_tc_"  # bpftool shows the kernel's 15-character program names


# -- topology -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def on_cpu(cpu: int):
    """This thread (and the processes it starts) runs on `cpu` only while the block runs: a
    packet it sends passes the egress hooks there (each CPU writes to its own event ring)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def send_from_cpu(net, cpu: int, port: int, count: int, sport: int = 4000) -> None:
    """`count` UDP datagrams from net.ns1 to net.ip2:`port`, sent from `cpu`: the veth's egress
    hook, and the receive path the veth hands them to, run on that CPU."""
    with on_cpu(cpu):
        send_udp(net.ns1, net.ip2, port, count=count, sport=sport)


def veth_pair(subnet: int = 77):
    """ns1/ifA <-veth-> ns2/ifB, offloads off, 10.199.<subnet>.1 and .2, ARP done."""
    return _veth_pair(subnet)


@contextlib.contextmanager
def udp_stream(ns: str, dst: str, dport: int, interval: float = 0.01):
    """Send UDP datagrams from `ns` to dst:dport every `interval` s until the block ends."""
    stop = threading.Event()
    sent = [0]

    def run() -> None:
        while not stop.is_set():
            send_udp(ns, dst, dport, count=1, payload_fn=lambda _i: b"vnet-stream-%06d" % sent[0])
            sent[0] += 1
            stop.wait(interval)

    thread = threading.Thread(target=run, name=f"udp-stream-{dport}", daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        stop.set()
        thread.join(timeout=5)


def wait_until(pred, timeout: float, interval: float = 0.05):
    """Call pred() until it returns something truthy or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# -- what is attached -----------------------------------------------------------------------------------

def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30).stdout


def bpftool_json(*args: str):
    """bpftool's JSON listing. A program or link that vanishes while bpftool walks
    the IDs makes it fail: such a listing is taken again (bounded; other processes that load
    and unload programs all the time, e.g. another test run, need more than a few tries)."""
    for attempt in range(30):
        proc = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            return json.loads(proc.stdout or "[]")
        time.sleep(0.1)
    raise AssertionError(f"bpftool {' '.join(args)} failed 30 times: {proc.stderr.strip()}")


def live_bpf() -> tuple[dict[int, str], dict[int, int]]:
    """Every program (id -> name) and every link (id -> prog id) in the kernel right now."""
    progs = {p["id"]: p.get("name", "") for p in bpftool_json("prog", "show")}
    links = {ln["id"]: ln.get("prog_id", 0) for ln in bpftool_json("link", "show")}
    return progs, links


@dataclass(frozen=True)
class BpfIds:
    progs: frozenset[int]
    links: frozenset[int]
    maps: frozenset[int] = frozenset()


def bpf_ids_held_by(pid: int | str) -> BpfIds:
    """Programs, links and maps `pid` holds through its file descriptors (/proc/PID/fdinfo)."""
    ids: dict[str, set[int]] = {"prog_id": set(), "link_id": set(), "map_id": set()}
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            kind = os.readlink(f"{fd_dir}/{fd}")
            if kind not in ("anon_inode:bpf-prog", "anon_inode:bpf_link", "anon_inode:bpf-map"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.rstrip("\n").split(":", 1) for line in f if ":" in line)
        except (FileNotFoundError, ProcessLookupError):  # closed meanwhile
            continue
        for key, found in ids.items():
            if key in info:
                found.add(int(info[key]))
    return BpfIds(frozenset(ids["prog_id"]), frozenset(ids["link_id"]), frozenset(ids["map_id"]))


def bpf_ids_held_by_anyone() -> BpfIds:
    progs: set[int] = set()
    links: set[int] = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                ids = bpf_ids_held_by(pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            progs |= ids.progs
            links |= ids.links
    return BpfIds(frozenset(progs), frozenset(links))


def still_alive(ids: BpfIds) -> BpfIds:
    progs, links = live_bpf()
    return BpfIds(ids.progs & progs.keys(), ids.links & links.keys())


def wait_released(ids: BpfIds, timeout: float = 5.0) -> BpfIds:
    """Poll until none of `ids` exists in the kernel any more (release after a process
    exits is asynchronous); returns what still exists at the deadline (empty: all gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = still_alive(ids)
        if not (left.progs or left.links) or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def vnet_snapshot() -> BpfIds:
    """vnet programs (by name) and the links running them, system-wide."""
    progs, links = live_bpf()
    ours = {i for i, name in progs.items() if name.startswith(VNET_PROG_PREFIX)}
    return BpfIds(frozenset(ours), frozenset(i for i, p in links.items() if p in ours))


def new_orphans(before: BpfIds, timeout: float = 5.0) -> BpfIds:
    """vnet programs/links that appeared since `before` and that no process holds: only an
    attachment keeps them (a leftover). Other engineers' tests may load vnet programs
    concurrently; those are held by their processes (or are gone by the second look)."""

    def orphans() -> BpfIds:
        first = vnet_snapshot()
        held = bpf_ids_held_by_anyone()
        second = vnet_snapshot()
        return BpfIds((first.progs & second.progs) - before.progs - held.progs,
                      (first.links & second.links) - before.links - held.links)

    deadline = time.monotonic() + timeout
    while True:
        found = orphans()
        if not (found.progs or found.links) or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def tc_filters(ns: str, ifname: str, direction: str) -> list[str]:
    """Lines of `tc filter show` naming a filter handle (one per BPF filter)."""
    out = sh("tc", "-n", ns, "filter", "show", "dev", ifname, direction)
    return [ln for ln in out.splitlines() if " handle " in ln]


def has_clsact(ns: str, ifname: str) -> bool:
    return "qdisc clsact" in sh("tc", "-n", ns, "qdisc", "show", "dev", ifname)


def assert_nothing_on(ns: str, ifname: str) -> None:
    assert tc_filters(ns, ifname, "ingress") == []
    assert tc_filters(ns, ifname, "egress") == []
    assert not has_clsact(ns, ifname)


# -- a vnet CLI process -----------------------------------------------------------------------------------

class VnetProcess:
    """`python -m vnet ARGS` (or `argv`), stdout and stderr collected line by line by threads."""

    def __init__(self, *args: str, argv: list[str] | None = None, python: str = sys.executable,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None):
        self.argv = argv if argv is not None else [python, "-m", "vnet", *args]
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=cwd or ROOT,
                                     start_new_session=True)  # a terminal's Ctrl-C is not ours
        self._readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for t in self._readers:
            t.start()

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_stderr(self, text: str, timeout: float = 15.0) -> str:
        """The first stderr line containing `text`; fails with the output so far."""

        def found():
            return next((ln for ln in self.stderr if text in ln), None)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                self._cond.wait_for(lambda: found() is not None or self.proc.poll() is not None,
                                    max(0.0, min(0.2, deadline - time.monotonic())))
                line = found()
            if line is not None:
                return line
            if self.proc.poll() is not None:
                self._join()
                line = found()
                if line is not None:
                    return line
                break
        raise AssertionError(f"no {text!r} on stderr of {self.argv} (exit {self.proc.poll()}):\n"
                             + "\n".join(self.stderr))

    def wait_started(self, timeout: float = 15.0) -> str:
        return self.wait_stderr("vnet: tracing ", timeout)

    def wait_stdout(self, pred, timeout: float = 15.0) -> bool:
        """Wait until pred(stdout lines so far) holds; whether it did."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if pred(self.stdout):
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return bool(pred(self.stdout))
                self._cond.wait(min(0.2, left))

    def wait_stdout_quiet(self, quiet: float = 0.5, timeout: float = 10.0) -> int:
        """Wait until stdout has not grown for `quiet` seconds; the number of lines."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = len(self.stdout)
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.05)
        return len(self.stdout)

    def bpf_ids(self) -> BpfIds:
        return bpf_ids_held_by(self.pid)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def state(self) -> str:
        """The process state letter from /proc/PID/stat (R, S, T, Z, ...)."""
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def _join(self) -> None:
        for t in self._readers:
            t.join(timeout=5)

    def wait(self, timeout: float = 20.0) -> int:
        """Exit code; fails (after killing it) when it does not exit within `timeout`."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"{self.argv} still running after {timeout} s; stderr:\n" + "\n".join(self.stderr))
        self._join()
        return rc

    def summary(self) -> dict[str, int]:
        """The final stderr line, parsed."""
        lines = [m for ln in self.stderr if (m := SUMMARY.match(ln))]
        assert len(lines) == 1, "expected one summary line on stderr, got:\n" + "\n".join(self.stderr)
        printed, received, lost, seen, hooks = map(int, lines[0].groups())
        return {"printed": printed, "received": received, "lost": lost, "seen": seen, "hooks": hooks}

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._join()
        for stream in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()

    def __enter__(self) -> "VnetProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


EVENT_KEYS = {"ts_ns", "probe", "ifname", "ifindex", "dir", "len", "proto", "src", "dst", "sport", "dport", "pkt_id"}


def start_agent(ns: str, sock: Path, key: Path, spool: Path, host: str, *extra: str,
                env: dict[str, str] | None = None) -> "VnetProcess":
    """A real `vnet agent` in netns `ns` on a unix socket, once it listens (`env`: added to ours)."""
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "vnet", "agent", "--listen", f"unix:{sock}",
            "--key", str(key), "--spool", str(spool), "--host", host, *extra]
    p = VnetProcess(argv=argv, env={**os.environ, **env} if env else None)
    p.wait_stderr("agent listening on", timeout=20)
    return p


def start_collector(listen: str, key: Path, out: Path, ns: str | None = None) -> "VnetProcess":
    """A real `vnet collect` (in netns `ns`, else here) on `listen`, once it listens."""
    args = ["collect", "--listen", listen, "--key", str(key), "--out", str(out)]
    if not listen.startswith("unix:"):
        args.append("--allow-remote")
    p = VnetProcess(argv=(["ip", "netns", "exec", ns] if ns else []) + [sys.executable, "-m", "vnet", *args])
    p.wait_stderr("collector listening on", timeout=20)
    return p


def parse_event_line(line: str) -> dict:
    ev = json.loads(line)
    assert isinstance(ev, dict), line
    missing = EVENT_KEYS - ev.keys()
    assert not missing, f"event lacks {sorted(missing)}: {line}"
    assert re.fullmatch(r"[0-9a-f]{16}", ev["pkt_id"]), line
    assert ev["dir"] in ("ingress", "egress") and isinstance(ev["len"], int) and ev["len"] > 0, line
    return ev
