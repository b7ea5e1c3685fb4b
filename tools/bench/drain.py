#!/usr/bin/env python3
"""Agent drain: events/s from the BPF ring buffer to disk and to a collector, with
the losses counted, for vnet's production consumers against a C reference.

Consumers (each a process of its own, whose CPU is what is measured):
  c        tools/bench/ring_consumer.c, built here with gcc: libbpf's
           ring_buffer__poll callback per record, records appended to a file
           through a 4 MiB buffer (the reference; reads the ring of an object
           this script loads with the configuration `vnet trace` uses)
  trace    `vnet trace -i NS/ifA -d ingress -w FILE` (RingBatchReader batches ->
           TraceFileWriter: what the CLI does)
  agent    a running `vnet agent` given a trace by a dispatcher (this script),
           shipping its chunks over loopback TCP to a running `vnet collect`,
           which writes them to disk; delivered = acknowledged by the collector;
           its memory queue is files on tmpfs (--queue-dir, the default)
  agent-heap  the same with the memory queue in the agent's heap (what a kill
           loses; the agent's queue before it outlived a kill): not by default

The events: the real tc program of that consumer's trace (found through the file
descriptors the process holds; for `c` the one loaded here), run by
BPF_PROG_TEST_RUN with a repeat count on a 66-byte UDP frame (152-byte records),
from a producer process of its own:
  rate R   R events/s for --seconds (one test run of R/1000 repeats per ms)
  max      as fast as the producer can for --seconds (test runs of 1024)
  backlog  the consumer stopped (SIGSTOP), --backlog-events put into a ring of
           --backlog-ring bytes, the consumer continued (SIGCONT): how fast one
           core empties the ring with nobody producing

Measured per run: events produced (the producer's count), read from the ring and
written (the output file, or the collector's file for the agent), lost (the
kernel's per-CPU counter of failed reservations, summed), events/s (events over
the time from the first event produced to the last one read from the ring; for
the agent also to the collector's last acknowledgement), CPU of the consuming
process (the sum over its threads of /proc/PID/task/TID/schedstat, from the
start of production until done) per event, and the consumer's VmRSS, sampled
every ~20 ms (the agent's includes the part of its chunk queue it has read to send:
--queue-mb 512 here, for the backlog; the trace's ring is mapped once, so its bytes
count once). Runs alternate between consumers
(the order rotates every round); medians and min-max over rounds are printed.

Every consumer loads the eBPF objects committed at HEAD (copied out; --bpf-dir
to use others), whatever the checkout holds meanwhile; with --compare-to REV, the
consumers of REV's code load the objects committed at REV (a before/after of the
kernel side too; --same-objects: HEAD's for both). The producer runs on
CPU 0, the consumer's threads are pinned to CPU 1 (--cpus; the collector is not pinned).

Needs root, gcc or clang and libbpf-dev (make bench-deps). Numbers are of this
machine at this moment: compare the consumers, not absolute values across days.

Usage: drain.py [--rounds 3] [--rates 100000,500000] [--seconds 3]
                [--backlog-events 1000000] [--compare-to REV] [--bpf-dir DIR]
                [--only c,trace,agent] [--scenarios rate,max,backlog]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from revisions import connect_for  # noqa: E402  (tools/bench, beside this script)

PY = sys.executable
C_SOURCE = Path(__file__).with_name("ring_consumer.c")
# How often the agent is asked whether the collector has acknowledged everything: its answer
# costs the agent a little CPU, the interval is up to that much added to "delivered" (20 ms
# before 2026-11-27 12:09: ~4% of a backlog's 0.25 s on average; the same for every code compared).
DELIVERED_POLL_S = 0.005
RECORD_RING_BYTES = 160   # 152-byte event + 8-byte header
MAX_BATCH = 1024          # repeats per test run at max rate
PRODUCER_CPU, CONSUMER_CPU = 0, 1  # the consumer's threads share no CPU with the producer

FRAME = (b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"  # Ethernet, IPv4 UDP 10.0.0.1 -> 10.0.0.2
         + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 36, 1, 0x4000, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
         + struct.pack("!HHHH", 4000, 5000, 16, 0) + b"ring-bench")


# -- the kernel objects of a consumer's trace -----------------------------------------------------------

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
_lib.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
_lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
_lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def _check_fd(fd: int, what: str) -> int:
    if fd < 0:
        raise OSError(-fd, f"{what}: {os.strerror(-fd)}")
    return fd


def _info(fd: int) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = ctypes.c_uint32(256)
    err = _lib.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n))
    if err:
        raise OSError(-err, f"bpf_obj_get_info_by_fd: {os.strerror(-err)}")
    return buf.raw


def _prog_name(fd: int) -> str:
    return _info(fd)[64:80].split(b"\0")[0].decode()  # struct bpf_prog_info.name


def _map_info(fd: int) -> tuple[str, int, int]:
    """(name, max_entries, value_size) from struct bpf_map_info."""
    raw = _info(fd)
    _type, _id, _key, value_size, max_entries = struct.unpack_from("=5I", raw, 0)
    return raw[24:40].split(b"\0")[0].decode(), max_entries, value_size


def held_ids(pid: int) -> tuple[set[int], set[int]]:
    """Program and map ids `pid` holds through its file descriptors (/proc/PID/fdinfo)."""
    progs, maps = set(), set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kind = os.readlink(f"/proc/{pid}/fd/{fd}")
            if kind not in ("anon_inode:bpf-prog", "anon_inode:bpf-map"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if "prog_id" in info:
            progs.add(int(info["prog_id"]))
        if "map_id" in info:
            maps.add(int(info["map_id"]))
    return progs, maps


def _stat_index() -> dict[str, int]:
    from vnet.binding import Btf
    from vnet.objects import object_path

    with Btf.from_file(str(object_path("tc_trace"))) as btf:
        return {k.removeprefix("VNET_STAT_").lower(): v for k, v in btf.enum("vnet_stat").items() if k != "VNET_STAT_MAX"}


STAT = _stat_index()


class Kernel:
    """The tc program to test-run, the ring to watch and the loss counters of one
    consumer's trace. Holds its own fds (the consumer may exit first)."""

    def __init__(self, prog_fd: int, ring_fd: int, stats_fd: int):
        self.prog_fd, self.ring_fd, self.stats_fd = prog_fd, ring_fd, stats_fd
        _, self.ring_bytes, _ = _map_info(ring_fd)
        _, _, self.stats_value = _map_info(stats_fd)
        page = mmap.PAGESIZE
        self._pos = mmap.mmap(ring_fd, 2 * page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0)
        self._page = page

    @classmethod
    def of_process(cls, pid: int, timeout: float = 10.0) -> "Kernel":
        """The vnet_tc_ingress program and its vnet_events/vnet_stats maps that `pid` holds; of
        its rings (one per CPU, vnet_events then vnet_events_1, ...), the producer CPU's."""
        deadline = time.monotonic() + timeout
        while True:
            prog_ids, map_ids = held_ids(pid)
            maps = [(_map_info(fd)[0], fd) for fd in (_lib.bpf_map_get_fd_by_id(mid) for mid in map_ids) if fd >= 0]
            ring = _ring_of_cpu([name for name, _ in maps], PRODUCER_CPU)
            fds: dict[str, list[int]] = {"vnet_tc_ingress": [], ring: [], "vnet_stats": []}
            for pid_ in prog_ids:
                fd = _lib.bpf_prog_get_fd_by_id(pid_)
                if fd >= 0:
                    name = _prog_name(fd)
                    (fds[name].append(fd) if name in fds else os.close(fd))
            for name, fd in maps:
                (fds[name].append(fd) if name in fds else os.close(fd))
            if all(len(v) == 1 for v in fds.values()):
                return cls(fds["vnet_tc_ingress"][0], fds[ring][0], fds["vnet_stats"][0])
            for v in fds.values():
                for fd in v:
                    os.close(fd)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"process {pid}: expected one tc program and one vnet ring, found "
                                   f"{ {k: len(v) for k, v in fds.items()} }")
            time.sleep(0.05)

    def positions(self) -> tuple[int, int]:
        """(consumer, producer) byte positions of the ring."""
        cons = struct.unpack_from("=Q", self._pos, 0)[0]
        prod = struct.unpack_from("=Q", self._pos, self._page)[0]
        return cons, prod

    def drained(self) -> bool:
        cons, prod = self.positions()
        return cons == prod

    def counters(self) -> dict[str, int]:
        """The kernel's counters of probe 0, summed over CPUs (what vnet reports)."""
        ncpu = os.cpu_count() if not Path("/sys/devices/system/cpu/possible").exists() else _possible_cpus()
        step = (self.stats_value + 7) & ~7
        buf = ctypes.create_string_buffer(step * ncpu)
        key = ctypes.c_uint32(0)
        err = _lib.bpf_map_lookup_elem(self.stats_fd, ctypes.byref(key), buf)
        if err:
            raise OSError(-err, "lookup vnet_stats")
        n = self.stats_value // 8
        out = {name: 0 for name in STAT}
        for cpu in range(ncpu):
            values = struct.unpack_from(f"={n}Q", buf.raw, cpu * step)
            for name, i in STAT.items():
                out[name] += values[i]
        return out

    def close(self) -> None:
        self._pos.close()
        for fd in (self.prog_fd, self.ring_fd, self.stats_fd):
            os.close(fd)


def _ring_of_cpu(names: list[str], cpu: int) -> str:
    """Which of a trace's rings `cpu` writes to: CPU i the ring i mod their number."""
    n = sum(1 for name in names if name == "vnet_events" or name.startswith("vnet_events_"))
    i = cpu % max(1, n)
    return "vnet_events" if i == 0 else f"vnet_events_{i}"


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` (scheduler's ns, /proc/PID/task/*/schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def vm_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


# -- the producer (a process of its own) ----------------------------------------------------------------

def produce_main(argv: list[str]) -> None:
    """_produce PROG_FD RATE TOTAL BATCH: wait for 'go' on stdin, run the program,
    print what was produced as JSON."""
    from vnet.binding.libbpf import ffi, lib

    prog_fd, rate, total, batch, seconds_ms, cpu = (int(a) for a in argv)
    os.sched_setaffinity(0, {cpu})
    data_in = ffi.from_buffer(FRAME)
    out = ffi.new("char[]", len(FRAME) + 256)
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    opts.data_in = data_in
    opts.data_size_in = len(FRAME)
    opts.data_out = out
    run = lib().bpf_prog_test_run_opts
    print("ready", flush=True)
    sys.stdin.readline()
    done = 0
    t0 = time.monotonic()
    end = t0 + seconds_ms / 1000 if seconds_ms else None
    while done < total:
        n = min(batch, total - done)
        if end is not None and time.monotonic() >= end:
            break
        if rate:
            wait = t0 + done / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        opts.repeat = n
        opts.data_size_out = len(FRAME) + 256
        err = run(prog_fd, opts)
        if err:
            raise SystemExit(f"test run failed: {os.strerror(-err)}")
        done += n
    t1 = time.monotonic()
    print(json.dumps({"produced": done, "t0": t0, "t1": t1}), flush=True)


class Producer:
    def __init__(self, kernel: Kernel, rate: int, total: int, batch: int, seconds: float = 0.0):
        self.proc = subprocess.Popen([PY, __file__, "_produce", str(kernel.prog_fd), str(rate), str(total), str(batch),
                                      str(int(seconds * 1000)), str(PRODUCER_CPU)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     pass_fds=[kernel.prog_fd], cwd=ROOT)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("producer did not start")

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        line = self.proc.stdout.readline()
        self.proc.wait(timeout=60)
        if not line:
            raise RuntimeError(f"producer failed (exit {self.proc.returncode})")
        return json.loads(line)


# -- the consumers ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    written: int                  # events in the output file
    reported_lost: int | None     # what the consumer itself reported as kernel losses
    extra: dict = field(default_factory=dict)


class CConsumer:
    code = None

    def __init__(self, binary: Path, workdir: Path, poll_ms: int = 100, obj_path: Path | None = None):
        self.binary, self.workdir, self.poll_ms, self.obj_path = binary, workdir, poll_ms, obj_path
        self.name = ("c" if poll_ms == 100 else f"c-{poll_ms}ms") + (f":{obj_path.stem}" if obj_path else "")
        self.proc = None
        self.obj = None

    def start(self, ring_bytes: int) -> Kernel:
        from vnet.binding import BpfObject
        from vnet.objects import object_path
        from vnet.trace.session import wakeup_config

        # what Trace loads for one device with no filter: probe 0, its wakeup policy for this ring
        obj = BpfObject(self.obj_path or object_path("tc_trace"))
        config = {"probe_id": 0, **wakeup_config(ring_bytes)}  # the rest 0: no filter
        layout = obj.config_layout("tc_cfg")
        obj.set_config("tc_cfg", {k: v for k, v in config.items() if any(f.name == k for f in layout.fields)})
        obj.keep_programs(["vnet_tc_ingress"])
        obj.maps["vnet_events"].max_entries = ring_bytes
        obj.load()
        self.obj = obj
        ring_fd = obj.maps["vnet_events"].fd
        self.out = self.workdir / "c.out"
        self.proc = subprocess.Popen([str(self.binary), str(ring_fd), str(self.out), str(self.poll_ms)],
                                     stdout=subprocess.PIPE,
                                     text=True, pass_fds=[ring_fd])
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("ring_consumer did not start")
        return Kernel(os.dup(obj.programs["vnet_tc_ingress"].fd), os.dup(ring_fd),
                      os.dup(obj.maps["vnet_stats"].fd))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, kernel: Kernel) -> Outcome:
        self.proc.send_signal(signal.SIGTERM)
        line = self.proc.stdout.read().strip()
        self.proc.wait(timeout=60)
        self.obj.close()
        events = int(line.split()[1])
        size = self.out.stat().st_size
        self.out.unlink()
        return Outcome(events, None, {"file_bytes": size})


HEAP_QUEUE = "/proc/vnet-no-queue-folder"   # a --queue-dir that cannot be made: the agent queues in its heap


def _vnet(code: Path, *args: str, bpf_dir: Path | None = None, **kw) -> subprocess.Popen:
    """`python -m vnet ARGS` with the vnet package of `code` (this tree or a worktree of --compare-to),
    loading the objects of `bpf_dir` (default: $VNET_BPF_DIR as use_objects() set it)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    if bpf_dir is not None:
        env["VNET_BPF_DIR"] = str(bpf_dir)
    return subprocess.Popen([PY, "-m", "vnet", *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=code, env=env, **kw)


def pin(pid: int, cpu: int) -> None:
    """Every thread of `pid` onto `cpu` (threads started later inherit it from theirs)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass


class TraceConsumer:
    def __init__(self, iface: str, workdir: Path, code: Path = ROOT, label: str = "", bpf_dir: Path | None = None):
        self.iface, self.workdir, self.code, self.bpf_dir = iface, workdir, code, bpf_dir
        self.name = "trace" + label
        self.proc = None

    def start(self, ring_bytes: int) -> Kernel:
        self.out = self.workdir / "trace.vnt"
        self.proc = _vnet(self.code, "trace", "-i", self.iface, "-d", "ingress", "-w", str(self.out),
                          "--ring-size", str(ring_bytes), bpf_dir=self.bpf_dir)
        for line in self.proc.stderr:
            if line.startswith("vnet: tracing"):
                break
        else:
            raise RuntimeError(f"vnet trace did not start (exit {self.proc.wait()})")
        return Kernel.of_process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, kernel: Kernel) -> Outcome:
        self.proc.send_signal(signal.SIGINT)
        err = self.proc.stderr.read()
        if self.proc.wait(timeout=60) != 0:
            raise RuntimeError(f"vnet trace failed: {err}")
        written, lost = read_trace_file(self.out)
        size = self.out.stat().st_size
        self.out.unlink()
        return Outcome(written, lost, {"file_bytes": size})


def quiet_link(net) -> None:
    """No packet of the kernel's own on the traced link: its MLD reports and ARP
    probes arrive at the traced hook at any time and would be counted as written
    (a run once wrote 1,000,001 events for 1,000,000 produced: an MLD report)."""
    for ns, ifname in ((net.ns1, net.if1), (net.ns2, net.if2)):
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"],
                       check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "dev", ifname, "arp", "off"], check=True)


def read_trace_file(path: Path) -> tuple[int, int | None]:
    """Events in a vnet trace file's events chunks, and the kernel losses its end chunk reports."""
    from vnet.collector.tracefile import TraceFileReader

    written, lost = 0, None
    for chunk in TraceFileReader(path).chunks(kinds=("events", "end"), views=True):
        if chunk["kind"] == "events":
            written += int(chunk["count"])
        else:
            lost = int((chunk.get("losses") or {}).get("kernel_ring_full", 0))
    return written, lost


class AgentConsumer:
    """A `vnet agent` and a `vnet collect` that stay up across runs, as in production;
    each run is one trace the agent is given by this script (the dispatcher's requests)."""

    def __init__(self, iface: str, workdir: Path, code: Path = ROOT, label: str = "", bpf_dir: Path | None = None,
                 queue_mb: int = 512, agent_args: tuple[str, ...] = ()):
        from vnet.protocol import new_key

        self.name = "agent" + label
        self.iface, self.code = iface, code
        self.workdir = workdir = workdir / self.name.replace("@", "-")
        workdir.mkdir()
        self.key_path = new_key(workdir / "key")
        self.sock = workdir / "agent.sock"
        self.col_out = workdir / "collected"
        port = _free_port()
        self.collector_address = f"127.0.0.1:{port}"
        self.collector = _vnet(code, "collect", "--listen", self.collector_address, "--key", str(self.key_path),
                               "--out", str(self.col_out), bpf_dir=bpf_dir)
        _wait_line(self.collector, "collector listening on")
        # --queue-mb 512: the backlog runs put 160 MB in the ring at once; in memory, not the disk spool
        self.agent = _vnet(code, "agent", "--listen", f"unix:{self.sock}", "--key", str(self.key_path),
                           "--spool", str(workdir / "spool"), "--host", "h1", "--queue-mb", str(queue_mb), *agent_args,
                           bpf_dir=bpf_dir)
        _wait_line(self.agent, "agent listening on")
        for p in (self.collector, self.agent):  # keep their stderr pipes from filling up
            threading.Thread(target=lambda s=p.stderr: [None for _ in s], daemon=True).start()
        self.runs = 0
        self.ch = None

    @property
    def pid(self) -> int:
        return self.agent.pid

    def start(self, ring_bytes: int) -> Kernel:
        from vnet.dispatch.spec import loads
        from vnet.protocol import load_key

        connect = connect_for(self.code)

        self.runs += 1
        self.trace_name = f"drain{self.runs}"
        spec = loads(f"""
[trace]
name = "{self.trace_name}"
ring_size = {ring_bytes}
[collector]
address = "{self.collector_address}"
[[host]]
name = "h1"
agent = "unix:{self.sock}"
interfaces = ["{self.iface}"]
direction = "ingress"
""")
        self.ch = connect(f"unix:{self.sock}", load_key(self.key_path), "agent")
        self.ch.request({"type": "hello"}, ("hello",))
        self.ch.request({"type": "start", "package": spec.control_package(spec.hosts[0])}, ("started",))
        return Kernel.of_process(self.agent.pid)

    def status(self) -> dict:
        return self.ch.request({"type": "status"}, ("status",))

    def delivered(self, produced_events: int) -> bool:
        st = self.status()
        k = st["kernel"]
        return st["read"] >= k["emitted"] and st["shipper"]["queued"] == 0 and st["shipper"]["acked"] == st["chunks"] - 1

    def stop(self, kernel: Kernel) -> Outcome:
        summary = self.ch.request({"type": "stop"}, ("stopped",))
        self.ch.close()
        path = self.col_out / self.trace_name / "h1.vnt"
        written, _ = read_trace_file(path)
        shutil.rmtree(self.col_out / self.trace_name)
        losses = summary.get("losses", {})
        return Outcome(written, int(losses.get("kernel_ring_full", 0)),
                       {"agent_unread": losses.get("agent_unread"), "spool_full": losses.get("agent_spool_full"),
                        "delivered": summary.get("delivered")})

    def close(self) -> None:
        for p in (self.agent, self.collector):
            p.send_signal(signal.SIGTERM)
        for p in (self.agent, self.collector):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_line(proc: subprocess.Popen, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"{proc.args[:4]}: no {text!r} (exit {proc.poll()})")


# -- one run ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    consumer: str
    scenario: str
    produced: int
    written: int
    lost: int              # the kernel's counter
    reported_lost: int | None
    seconds: float         # first event produced -> last event read from the ring
    delivered_s: float | None  # agent: -> last chunk acknowledged by the collector
    cpu_s: float           # the consumer process
    collector_cpu_s: float | None
    produce_rate: float    # what the producer achieved
    extra: dict

    @property
    def events_per_s(self) -> float:
        return self.written / (self.delivered_s or self.seconds)

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu_s * 1e6 / max(1, self.written)

    def line(self) -> str:
        col = f" collector {self.collector_cpu_s * 1e6 / max(1, self.written):.3f} us/ev" if self.collector_cpu_s else ""
        dl = f", delivered in {self.delivered_s:.3f} s" if self.delivered_s else ""
        return (f"{self.consumer:>12} {self.scenario:>8}: produced {self.produced:>9,} at {self.produce_rate / 1e6:.2f} M/s, "
                f"written {self.written:>9,}, lost {self.lost:>8,} (reported {self.reported_lost}), "
                f"{self.events_per_s / 1e6:6.3f} M events/s (read in {self.seconds:.3f} s{dl}), "
                f"cpu {self.cpu_us_per_event:.3f} us/ev{col}, ring fill max {self.extra['max_fill']:.0%}, "
                f"VmRSS max sampled {self.extra['rss_max_kb'] / 1024:.1f} MiB")


def run_once(consumer, scenario: str, args, rate: int = 0) -> Run:
    backlog = scenario == "backlog"
    ring = args.backlog_ring if backlog else args.ring
    kernel = consumer.start(ring)
    pin(consumer.pid, CONSUMER_CPU)
    try:
        seconds = 0.0
        if scenario == "max":
            total, batch, seconds = 1 << 62, MAX_BATCH, args.seconds
        elif backlog:
            total, batch = args.backlog_events, MAX_BATCH
            if total * RECORD_RING_BYTES > ring:
                raise SystemExit(f"--backlog-events {total} do not fit a ring of {ring} bytes")
        else:
            total, batch = int(rate * args.seconds), max(1, rate // 1000)
        before = kernel.counters()
        producer = Producer(kernel, rate, total, batch, seconds)
        collector_pid = consumer.collector.pid if isinstance(consumer, AgentConsumer) else None
        if backlog:
            os.kill(consumer.pid, signal.SIGSTOP)
            producer.go()
            produced = producer.result()
            cpu0 = cpu_ns(consumer.pid)
            col0 = cpu_ns(collector_pid) if collector_pid else 0
            t0 = time.monotonic()
            os.kill(consumer.pid, signal.SIGCONT)
        else:
            cpu0 = cpu_ns(consumer.pid)
            col0 = cpu_ns(collector_pid) if collector_pid else 0
            producer.go()
            t0 = None
        # until the last event is out of the ring (the producer done, nothing pending)
        done_producing = backlog
        fill = rss = 0
        polls = 0
        while True:
            if not done_producing and producer.proc.poll() is not None:
                done_producing = True
            cons, prod = kernel.positions()
            fill = max(fill, prod - cons)
            polls += 1
            if polls % 40 == 0:  # the consumer's resident memory, every ~20 ms
                rss = max(rss, vm_kb(consumer.pid).get("VmRSS", 0))
            if done_producing and kernel.drained():
                t_read = time.monotonic()
                break
            time.sleep(0.0005)
        if not backlog:
            produced = producer.result()
            t0 = produced["t0"]
        delivered = None
        if isinstance(consumer, AgentConsumer):
            while not consumer.delivered(produced["produced"]):
                rss = max(rss, vm_kb(consumer.pid).get("VmRSS", 0))
                time.sleep(DELIVERED_POLL_S)
            delivered = time.monotonic() - t0
        cpu1 = cpu_ns(consumer.pid)
        col1 = cpu_ns(collector_pid) if collector_pid else 0
        after = kernel.counters()
        out = consumer.stop(kernel)
    finally:
        kernel.close()
    prate = produced["produced"] / max(1e-9, produced["t1"] - produced["t0"])
    return Run(consumer.name, scenario if scenario != "rate" else f"{rate // 1000}k/s", produced["produced"],
               out.written, after["lost"] - before["lost"], out.reported_lost, t_read - t0, delivered,
               (cpu1 - cpu0) / 1e9, (col1 - col0) / 1e9 if collector_pid else None, prate,
               {**out.extra, "emitted": after["emitted"] - before["emitted"], "max_fill": fill / kernel.ring_bytes,
                "rss_max_kb": rss})


def committed_objects(rev: str, folder: Path) -> Path:
    """The objects of bpf/build/ as committed at `rev`, copied into `folder`."""
    folder.mkdir()
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "bpf/build/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        data = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True, capture_output=True).stdout
        (folder / Path(name).name).write_bytes(data)
    return folder.resolve()


def use_objects(bpf_dir: Path | None, workdir: Path) -> None:
    """Every consumer of this tree (this process, its vnet processes) loads the objects of one
    folder ($VNET_BPF_DIR); those of --compare-to load their revision's, unless --same-objects."""
    if bpf_dir is None:
        bpf_dir = committed_objects("HEAD", workdir / "bpf")
    os.environ["VNET_BPF_DIR"] = str(bpf_dir.resolve())


def build_reference(workdir: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("clang")
    if cc is None or not Path("/usr/include/bpf/libbpf.h").exists():
        raise SystemExit("drain.py: the C reference needs gcc (or clang) and libbpf-dev: run 'make bench-deps'")
    binary = workdir / "ring_consumer"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(C_SOURCE), "-lbpf"], check=True)
    return binary


def summarize(runs: list[Run], compare_to: str | None = None) -> list[str]:
    def fmt(values, scale=1.0, digits=3):
        v = [x * scale for x in values]
        return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"

    lines = [f"{'scenario':>8} {'consumer':>12} | {'M events/s median (min-max)':>28} | {'consumer CPU us/event':>24} | "
             f"{'M ev/s per core':>15} | {'lost (kernel) max':>17} | {'written/produced min-max':>24} | "
             f"{'collector CPU us/ev':>22}"]
    keys = list(dict.fromkeys((r.scenario, r.consumer) for r in runs))
    medians = {}
    for scenario, consumer in keys:
        rs = [r for r in runs if (r.scenario, r.consumer) == (scenario, consumer)]
        col = fmt([r.collector_cpu_s * 1e6 / max(1, r.written) for r in rs]) if rs[0].collector_cpu_s is not None else "-"
        cpu = statistics.median(r.cpu_us_per_event for r in rs)
        medians[scenario, consumer] = (statistics.median(r.events_per_s for r in rs), cpu)
        lines.append(f"{scenario:>8} {consumer:>12} | {fmt([r.events_per_s for r in rs], 1e-6):>28} | "
                     f"{fmt([r.cpu_us_per_event for r in rs]):>24} | {1 / cpu:>15.2f} | {max(r.lost for r in rs):>17,} | "
                     f"{min(r.written / r.produced for r in rs):>17.4f}-{max(r.written / r.produced for r in rs):.4f} | {col:>22}")
    if compare_to:
        lines.append("")
        for (scenario, consumer), (rate, cpu) in medians.items():
            old = medians.get((scenario, f"{consumer}@{compare_to}"))
            if old:
                lines.append(f"{scenario:>8} {consumer:>12}: this tree / {compare_to}: {rate / old[0]:.2f}x events/s, "
                             f"{cpu / old[1]:.2f}x CPU per event")
    return lines


def main() -> None:
    global PRODUCER_CPU, CONSUMER_CPU
    if len(sys.argv) > 1 and sys.argv[1] == "_produce":
        return produce_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rates", default="100000,500000", help="offered rates, events/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="how long each offered rate is sustained")
    ap.add_argument("--backlog-events", type=int, default=1_000_000)
    ap.add_argument("--ring", type=int, default=8 << 20, help="ring bytes (vnet's default: 8 MiB)")
    ap.add_argument("--backlog-ring", type=int, default=256 << 20)
    ap.add_argument("--only", default="c,trace,agent")
    ap.add_argument("--scenarios", default="rate,max,backlog")
    ap.add_argument("--cpus", default=f"{PRODUCER_CPU},{CONSUMER_CPU}", metavar="PRODUCER,CONSUMER",
                    help="where the producer runs and the consumer's threads are pinned")
    ap.add_argument("--bpf-dir", type=Path, help="the eBPF objects every consumer loads (default: bpf/build/ as "
                    "committed at HEAD, so that work in progress in the checkout does not change the producer)")
    ap.add_argument("--c-object", type=Path, help="also run the C reference on this build of tc_trace.bpf.o "
                    "(an experiment with the kernel side)")
    ap.add_argument("--compare-to", metavar="REV", help="also run trace and agent with this git revision's code "
                    "(a temporary worktree) and eBPF objects, alternated with this tree's")
    ap.add_argument("--same-objects", action="store_true", help="--compare-to: the revision's code loads this "
                    "tree's objects too (compare the user-space side alone)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("drain.py needs root")
    PRODUCER_CPU, CONSUMER_CPU = (int(c) for c in args.cpus.split(","))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (netns, processes) on kill too
    from vnet.topology import veth_pair

    workdir = Path(tempfile.mkdtemp(prefix="vnet-drain-"))
    use_objects(args.bpf_dir, workdir)
    scenarios = []
    for s in args.scenarios.split(","):
        scenarios += [("rate", int(r)) for r in args.rates.split(",")] if s == "rate" else [(s, 0)]
    names = args.only.split(",")
    runs: list[Run] = []
    consumers = {}
    tree = workdir / "baseline"
    try:
        codes = [(ROOT, "", None)]
        if args.compare_to:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), args.compare_to],
                           check=True, capture_output=True)
            rev_objects = None if args.same_objects else committed_objects(args.compare_to, workdir / "bpf-rev")
            codes.append((tree, "@" + args.compare_to, rev_objects))
        with veth_pair(91) as net:
            quiet_link(net)
            iface = f"{net.ns1}/{net.if1}"
            if "c" in names:
                consumers["c"] = CConsumer(build_reference(workdir), workdir)
            if "c-10ms" in names:  # the reference woken by a 10 ms timer instead of 100 ms
                consumers["c-10ms"] = CConsumer(build_reference(workdir), workdir, poll_ms=10)
            if args.c_object:
                c = CConsumer(build_reference(workdir), workdir, obj_path=args.c_object.resolve())
                consumers[c.name] = c
            for code, label, objects in codes:
                if "trace" in names:
                    consumers["trace" + label] = TraceConsumer(iface, workdir, code, label, objects)
                if "agent" in names:
                    consumers["agent" + label] = AgentConsumer(iface, workdir, code, label, objects)
                if "agent-heap" in names and not label:  # the memory queue in the heap, not on tmpfs
                    consumers["agent-heap"] = AgentConsumer(iface, workdir, code, "-heap", objects,
                                                            agent_args=("--queue-dir", HEAP_QUEUE))
            order = list(consumers.values())
            print(f"{time.strftime('%Y-%m-%d %H:%M')}, kernel {os.uname().release}, {os.cpu_count()} CPUs, "
                  f"ring {args.ring >> 20} MiB (backlog {args.backlog_ring >> 20} MiB), {args.rounds} rounds", flush=True)
            for rnd in range(args.rounds):
                for scenario, rate in scenarios:
                    k = rnd % len(order)
                    for consumer in order[k:] + order[:k]:  # alternate: the order rotates every round
                        r = run_once(consumer, scenario, args, rate)
                        runs.append(r)
                        print(f"round {rnd + 1} " + r.line(), flush=True)
            for c in consumers.values():
                if isinstance(c, AgentConsumer):
                    print(f"{c.name} VmRSS/VmHWM after the runs: {vm_kb(c.pid)} kB", flush=True)
    finally:
        for c in consumers.values():
            if isinstance(c, AgentConsumer):
                c.close()
        if tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("\n".join(summarize(runs, args.compare_to)))


if __name__ == "__main__":
    main()
