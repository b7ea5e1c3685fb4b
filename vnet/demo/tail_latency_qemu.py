"""`vnet demo tail-latency-qemu`: the tail-latency case study with a real hypervisor.

The same question as `tail-latency` (issue 9 B), asked of a QEMU guest: a 6.1
Debian kernel under software emulation (virtme-ng, no KVM) whose virtio NIC is a
tap device on the host bridge, running a UDP echo server. QEMU's vCPU thread
(`CPU 0/TCG`) shares one CPU with a CPU-bound process; QEMU's other threads (its
main loop, which reads and writes the tap, as Xen's netback would in dom0) and the
client run on the other CPU::

    vm1 (netns): client, eth0 --veth-- tap1 \\
                                              br0 (host netns, where QEMU runs)
    guest (QEMU): echo server, virtio NIC --- tap2 /
    vm3 (netns): the hog          CPU B: QEMU's vCPU thread and, in the second run, the hog

vnet traces the host only (the guest runs no agent: the question is where the host's
time goes), both directions, plus the run-queue waits of QEMU's threads. A request's
path ends where QEMU reads it from the tap (`sock:consume_skb host/tap2`) and its
reply's starts where QEMU writes the answer; `vnet analyze --round-trip` pairs them,
so the time in between — the guest's turnaround: the vCPU woken, waiting for its CPU,
the guest kernel and the echo server working — is a segment, and the run-queue waits
of the vCPU thread are joined with it. The scenario expects the hog to add a tail to
the round trip, the round trip's tail to sit in the turnaround, run-queue waits to
explain it, the vCPU thread to be the one waiting, and the hog to be the one running.

The client's own socket read is left out of the analysis (`--ignore-hop
sock:consume_skb`): on 6.18 a UDP datagram is freed later, on the CPU that allocated
it (QEMU's), so that event's time says nothing about the client (see tail_latency).
The guest boots once (~25 s) and is warmed up before the runs: under software
emulation the first requests run code QEMU has not translated yet.

Needs QEMU, a 6.1 Debian kernel and virtme-ng (`make vm-deps`, tools/vm/setup.sh).
The guest stops on a datagram, or by its own deadline; QEMU is killed in `finally`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import DemoContext, DemoResult
from . import tail_latency as tl

NAME = "tail-latency-qemu"
TITLE = "Tail latency: a QEMU guest whose vCPU thread shares its CPU with a CPU-bound process"

INTERVAL_S = 0.002            # the guest needs ~0.5 ms of emulated CPU per request
REQUESTS = {True: 1500, False: 4000}
WARM_UP = 1000                # requests before the runs: QEMU translates the guest's code
TRACER_SETTLE_S = 1.0
GUEST_MEMORY = "1G"
BOOT_TIMEOUT = 300.0          # the echo server answering
GUEST_LIFE = 900              # the guest's own deadline (s)
VCPU_COMM = "CPU 0/TCG"       # QEMU names its threads with -name ...,debug-threads=on
STOP = b"vnet-stop"
MIN_TAIL_RATIO = 2.0
MIN_SHARE = 0.5
BUSY_TAIL_NS = 3_000_000      # a baseline round-trip p99 this slow: something else holds the CPUs

# Guest shell: set $IF to the virtio NIC. udev loads virtio_net and renames eth0 while the
# guest's command already runs, so wait for udev and pick the NIC by its driver (bounded).
FIND_VIRTIO_NIC = r'''udevadm settle --timeout=60 2>/dev/null
IF=
for i in $(seq 1 60); do
  for d in /sys/class/net/*; do
    [ "$(basename "$(readlink $d/device/driver 2>/dev/null)")" = virtio_net ] && IF=$(basename $d)
  done
  [ -n "$IF" ] && break
  sleep 1
done
'''

# Guest shell: the UDP echo server, until the stop datagram or its deadline (format it with
# port, life, stop, log).
ECHO_SERVER = r'''python3 -c '
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind(("0.0.0.0", {port}))
s.settimeout(1.0)
end = time.monotonic() + {life}
while time.monotonic() < end:
    try:
        data, peer = s.recvfrom(2048)
    except OSError:
        continue
    if data == b"{stop}":
        break
    s.sendto(data, peer)
' >> {log} 2>&1'''

_GUEST = r'''
log() {{ echo "$(cut -d' ' -f1 /proc/uptime) $*" >> {log}; }}
log booted
{find_nic}log "nic '$IF'"
ip link set "$IF" up && ip addr add {ip}/24 dev "$IF" || log "ip failed"
exec {echo}
log "echo server stopped"
'''


def _find_tools() -> tuple[str, str] | str:
    """(vng, kernel), or why they are missing."""
    root = Path(__file__).resolve().parents[2]
    vng = next((c for c in (shutil.which("vng"), str(root / "tools/vm/.venv/bin/vng")) if c and os.access(c, os.X_OK)),
               None)
    if not vng:
        return "virtme-ng (vng) is not installed (make vm-deps, or tools/vm/setup.sh)"
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (make vm-deps)"
    kernels = [k for k in sorted(glob.glob("/boot/vmlinuz-6.1.*"), reverse=True)
               if os.path.isdir(f"/lib/modules/{os.path.basename(k).removeprefix('vmlinuz-')}")]
    if not kernels:
        return "no /boot/vmlinuz-6.1.* with its modules (Debian's linux-image-amd64 6.1: make vm-deps)"
    return vng, kernels[0]


def available() -> str | None:
    """None when the scenario can run here, else why not."""
    found = _find_tools()
    return found if isinstance(found, str) else None


class _Guest:
    """QEMU booted by vng inside the host netns, its NIC on `tap`; stop() ends it."""

    def __init__(self, procs: tl._Procs, net: tl._Net, tap: str, folder: Path, script_text: str | None = None):
        vng, kernel = _find_tools()
        self.log = folder / "guest.log"
        script = folder / "guest.sh"
        log = shlex.quote(str(self.log))
        echo = ECHO_SERVER.format(port=tl.ECHO_PORT, life=GUEST_LIFE, stop=STOP.decode(), log=log)
        script.write_text(script_text or _GUEST.format(find_nic=FIND_VIRTIO_NIC, log=log, ip=tl.VM_IP, echo=echo))
        qemu_opts = (f"-netdev tap,id=n1,ifname={tap},script=no,downscript=no "
                     f"-device virtio-net-pci,netdev=n1,mac={tl.VM_MAC} -name vnet-guest,debug-threads=on")
        argv = ["ip", "netns", "exec", net.host_ns, vng, f"--qemu-opts={qemu_opts}", "--disable-kvm",
                "--disable-microvm", "--memory", GUEST_MEMORY, "--cpus", "1", "--run", kernel,
                "--rwdir", str(folder), "--exec", f"sh {shlex.quote(str(script))}"]
        env = dict(os.environ, PATH=f"{Path(vng).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        self.console = open(folder / "qemu.log", "wb")
        self.proc = procs.start(argv, stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT,
                                env=env)
        self.net = net
        self.qemu_pid = 0
        self.vcpu_tid = 0

    def story(self) -> str:
        parts = []
        for f in (self.log, Path(self.console.name)):
            text = f.read_text(errors="replace")[-1500:] if f.exists() else "(none)"
            parts.append(f"{f.name}: {text.strip()}")
        return "\n".join(parts)

    def wait_echo(self, timeout: float) -> float:
        """Until the guest's echo server answers; returns the seconds it took."""
        t0 = time.monotonic()
        with _client_socket(self.net) as s:
            while True:
                s.sendto(b"\xff\xff\xff\xffboot", (tl.VM_IP, tl.ECHO_PORT))
                try:
                    s.recv(2048)
                    return time.monotonic() - t0
                except TimeoutError:
                    if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                        raise RuntimeError(f"the QEMU guest's echo server did not answer in {timeout:.0f} s "
                                           f"(vng exit {self.proc.poll()}):\n{self.story()}") from None

    def find_threads(self) -> None:
        """QEMU's pid (in vng's session) and its vCPU thread."""
        for _ in range(50):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                sid = int(stat[stat.rindex(")") + 2:].split()[3])
                if sid == self.proc.pid and comm.startswith("qemu-system"):
                    self.qemu_pid = int(pid)
            if self.qemu_pid:
                break
            time.sleep(0.1)
        if not self.qemu_pid:
            raise RuntimeError("QEMU's process was not found in vng's session")
        for tid in os.listdir(f"/proc/{self.qemu_pid}/task"):
            with open(f"/proc/{self.qemu_pid}/task/{tid}/comm") as f:
                if f.read().strip() == VCPU_COMM:
                    self.vcpu_tid = int(tid)
        if not self.vcpu_tid:
            raise RuntimeError(f"QEMU has no thread named {VCPU_COMM!r} (debug-threads)")

    def pin(self, vcpu_cpu: int, other_cpu: int) -> None:
        """Every QEMU thread on other_cpu, then the vCPU thread on vcpu_cpu; all of them at
        the nice level of the scenario's other processes (the hog's, the client's), its
        session's autogroup too, so that the vCPU and the hog compete as equals and the
        main loop is not kept waiting by the tracer that shares its CPU."""
        for tid in os.listdir(f"/proc/{self.qemu_pid}/task"):
            try:
                os.sched_setaffinity(int(tid), {other_cpu})
                os.setpriority(os.PRIO_PROCESS, int(tid), tl.NICE)
            except OSError:
                pass  # a worker thread that ended
        os.sched_setaffinity(self.vcpu_tid, {vcpu_cpu})
        try:
            with open(f"/proc/{self.qemu_pid}/autogroup", "w") as f:
                f.write(str(tl.NICE))
        except OSError:
            pass  # no autogroups: the threads' nice levels still apply

    def stop(self, procs: tl._Procs) -> None:
        try:
            with _client_socket(self.net) as s:
                for _ in range(3):
                    s.sendto(STOP, (tl.VM_IP, tl.ECHO_PORT))
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)  # the guest powers off once its script ends
        except subprocess.TimeoutExpired:
            pass
        procs.stop(self.proc, signal.SIGTERM, timeout=20)  # vng's session: qemu with it
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.console.close()


class _client_socket:
    """A UDP socket in the client's netns with a short timeout."""

    def __init__(self, net: tl._Net):
        from vnet.topology import in_netns

        with in_netns(net.client_ns):
            self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.settimeout(0.5)

    def __enter__(self) -> socket.socket:
        return self.s

    def __exit__(self, *exc) -> None:
        self.s.close()


def _client(procs: tl._Procs, net: tl._Net, cpu: int, n: int) -> list[int]:
    life = n * INTERVAL_S + 40.0
    c, _ = tl._child(procs, net.client_ns, "client", cpu, life, tl.CLIENT_COMM, tl.VM_IP, tl.ECHO_PORT, n,
                     INTERVAL_S)
    try:
        out, err = c.communicate(timeout=life)
    except subprocess.TimeoutExpired:
        raise RuntimeError("the client did not finish") from None
    procs.procs.remove(c)
    if c.returncode != 0:
        raise RuntimeError(f"the client exited {c.returncode}: {err.strip()[-500:]}")
    return json.loads(out.strip().splitlines()[-1])["rtt_ns"]


def _measure(procs, net, guest: _Guest, run: tl._Run, n: int, shared: int, other: int, step) -> None:
    life = n * INTERVAL_S + 40.0
    step("attaching vnet trace", 0.0)
    tracer = tl._start_tracer(procs, net, guest.qemu_pid, run.trace, life, other, snap=False)
    time.sleep(TRACER_SETTLE_S)  # its first moments are busy on the CPU QEMU's main loop shares with it
    hog = None
    if run.hog:
        step(f"starting {tl.HOG_COMM}", 0.2)
        hog, hello = tl._child(procs, net.hog_ns, "hog", shared, life, tl.HOG_COMM)
        run.hog_pid = hello["pid"]
        time.sleep(0.3)
    step(f"{n} requests, 1 per {INTERVAL_S * 1000:.0f} ms", 0.3)
    run.rtt_ns = _client(procs, net, other, n)
    if hog is not None:
        procs.stop(hog)
    step("stopping vnet trace", 0.9)
    time.sleep(0.25)
    run.tracer_stderr = procs.stop(tracer, signal.SIGINT, timeout=30)
    m = tl._SUMMARY.search(run.tracer_stderr)
    run.lost_events = int(m[3]) if m else None
    if tracer.returncode != 0:
        raise RuntimeError(f"vnet trace exited {tracer.returncode}: {run.tracer_stderr.strip()[-800:]}")


def _analyse(run: tl._Run):
    """`vnet analyze --proto udp --dport ECHO_PORT --round-trip --ignore-hop sock:consume_skb`."""
    from vnet.analysis.report import analyze
    from vnet.analysis.roundtrip import describe, reverse, round_trips
    from vnet.analysis.stream import read_table, without_hops

    flow = tl._request_flow()
    ignore = ["sock:consume_skb"]  # the client's read: a deferred free on QEMU's CPU, not the client's time
    req = without_hops(read_table([run.trace], flow=flow), ignore)
    rep = without_hops(read_table([run.trace], flow=reverse(flow)), ignore)
    table, pairing = round_trips(req, rep)
    report = analyze(table, slowest=5)
    report["round_trip"] = pairing
    report["verdict"] = describe(pairing) + " " + report["verdict"]
    return report, table


_TURN = re.compile(r"^sock:consume_skb .*tap2$")


def _turnaround(report: dict) -> dict:
    """The main round trip's numbers, with the share of its tail in the guest's turnaround
    (QEMU's tap read of the request -> the reply entering the host)."""
    paths = report.get("paths") or []
    if not paths:
        return {}
    p = paths[0]
    segs = p["tail"]["segments"]
    turn = next((i for i, s in enumerate(segs) if _TURN.match(s["from"])), None)
    big = segs[p["tail"]["largest"]]
    seg_rows = {(s["from"], s["to"]): s for s in report["segments"]}
    return {"path": p["hops"], "round_trips": p["count"],
            "e2e": {k: p["e2e"][k] for k in ("p50_ns", "p99_ns", "p999_ns", "max_ns")},
            "tail_largest_segment": f"{big['from']} -> {big['to']}",
            "turnaround": (f"{segs[turn]['from']} -> {segs[turn]['to']}" if turn is not None else None),
            "tail_share_turnaround": segs[turn]["tail_share"] if turn is not None else 0.0,
            "turnaround_p50_ns": seg_rows[(segs[turn]["from"], segs[turn]["to"])]["p50_ns"] if turn is not None
            else None,
            "turnaround_p99_ns": seg_rows[(segs[turn]["from"], segs[turn]["to"])]["p99_ns"] if turn is not None
            else None}


def _judge(alone: tl._Run, hog: tl._Run, guest: _Guest) -> tuple[dict, str, bool, str]:
    ra, rh = tl._rtt_stats(alone), tl._rtt_stats(hog)
    ta, th = _turnaround(alone.report or {}), _turnaround(hog.report or {})
    sched = (hog.report or {}).get("sched") or {}
    threads = sched.get("threads") or []
    # the vCPU thread's waits, whoever had the CPU; and who had it most while the vCPU waited
    vcpu = [t for t in threads if t["waiting"].startswith(VCPU_COMM)]
    top = vcpu[0] if vcpu else (threads[0] if threads else {})
    ratios = {q: tl._ratio(rh[f"{q}_ns"], ra[f"{q}_ns"]) for q in ("p50", "p99", "p999")}
    share = sched.get("share_of_tail") or 0.0
    numbers = {
        "rtt": {"alone": ra, "with_hog": rh, "ratio": ratios},
        "round_trip": {"alone": ta, "with_hog": th},
        "pairing": {"alone": (alone.report or {}).get("round_trip"), "with_hog": (hog.report or {}).get("round_trip")},
        "sched": {"share_of_tail": sched.get("share_of_tail"), "tail_round_trips": sched.get("slow_packets"),
                  "with_overlap": sched.get("packets_with_overlap"), "runq_waits": sched.get("waits"),
                  "waiting": top.get("waiting"), "cpu_taken_by": top.get("cpu_taken_by"),
                  "threads": threads},
        "qemu": {"pid": guest.qemu_pid, "vcpu_tid": guest.vcpu_tid},
        "hog": {"comm": tl.HOG_COMM, "pid": hog.hog_pid},
        "events_lost": {"alone": alone.lost_events, "with_hog": hog.lost_events},
    }
    problems = []
    tail_ratio = max((r for r in (ratios["p99"], ratios["p999"]) if r is not None), default=None)
    if tail_ratio is None or tail_ratio < MIN_TAIL_RATIO:
        problems.append(f"the hog did not add a clear tail (p99 x{ratios['p99']}, p99.9 x{ratios['p999']})")
    if not th:
        problems.append("no round trip was paired")
    elif th["tail_share_turnaround"] < 0.5:
        problems.append(f"the round trip's tail is in {th['tail_largest_segment']}, not the guest's turnaround "
                        f"({th['tail_share_turnaround'] * 100:.0f}% there)")
    if share < MIN_SHARE:
        problems.append(f"run-queue waits explain only {share * 100:.0f}% of the tail")
    if not vcpu:
        problems.append("the vCPU thread was not among the threads waiting")
    elif not (top.get("cpu_taken_by") or "").startswith(tl.HOG_COMM):
        problems.append(f"the vCPU thread waited mostly behind {top.get('cpu_taken_by')}, not {tl.HOG_COMM}")
    # Without the hog, a round-trip p99 in the milliseconds means something else on the machine
    # held a CPU QEMU needed: the comparison is then not clean, and says so.
    busy = (ra["p99_ns"] or 0) >= BUSY_TAIL_NS
    numbers["baseline_noise"] = {"busy": busy, "rtt_p99_ns": ra["p99_ns"],
                                 "waits": ((alone.report or {}).get("sched") or {}).get("threads")}
    if busy and problems:
        problems.append(f"the machine was busy: without the hog the round trip's p99 was already "
                        f"{tl._us(ra['p99_ns'])}; run it on a quieter machine")
    ok = not problems
    us = tl._us
    words = (f"Round trip client -> QEMU guest (echo) -> client, {len(hog.rtt_ns)} requests, 1 per "
             f"{INTERVAL_S * 1000:.0f} ms: alone p50 {us(ra['p50_ns'])}, p99 {us(ra['p99_ns'])}, p99.9 "
             f"{us(ra['p999_ns'])}; with {tl.HOG_COMM} on the vCPU thread's CPU p50 {us(rh['p50_ns'])}, p99 "
             f"{us(rh['p99_ns'])}, p99.9 {us(rh['p999_ns'])} (p99 x{ratios['p99']}, p99.9 x{ratios['p999']}).")
    if th:
        words += (f" vnet paired each request with its reply on the host: {th['tail_share_turnaround'] * 100:.0f}% "
                  f"of the time of the round trips' p99 tail is the guest's turnaround, from QEMU reading the "
                  f"request off {th['turnaround'].split(' -> ')[0].split()[-1] if th['turnaround'] else 'the tap'} "
                  f"to the reply entering the host (its p99 {us(th['turnaround_p99_ns'])}, alone "
                  f"{us(ta.get('turnaround_p99_ns'))}).")
    if sched.get("slow_packets"):
        words += (f" Run-queue waits of QEMU's threads explain {share * 100:.0f}% of those round trips' time; "
                  f"{top.get('waiting', '?')} waited {us(top.get('overlap_ns'))} while "
                  f"{top.get('cpu_taken_by', '?')} had its CPU.")
    words += (" The added tail is the guest's vCPU thread waiting for its CPU behind the CPU-bound process, "
              "not the network." if ok else " Not the expected answer: " + "; ".join(problems) + ".")
    return numbers, words, ok, "; ".join(problems)


def prepare(ctx: DemoContext, name: str) -> DemoResult | tuple[Path, int, int]:
    """What a QEMU scenario checks first (numpy, QEMU, two CPUs): a DemoResult saying what is
    missing, or its folder and the two CPUs: the idlest for the vCPU thread and the hog
    (unrelated load disturbs the baseline least there), the other for everything else."""
    from vnet.analysis.extras import require

    require("numpy", f"vnet demo {name}")
    missing = available()
    if missing:
        return DemoResult(name, verdict=f"Needs QEMU: {missing}.", ok=False, why=missing)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return DemoResult(name, verdict="Needs two CPUs.", ok=False, why=f"only CPU {cpus} available")
    shared = tl._idlest(cpus)
    return Path(ctx.out_dir).resolve(), shared, next(c for c in cpus if c != shared)


def add_tap(topo, net: tl._Net) -> None:
    """The guest's tap on the host bridge (QEMU opens it by name)."""
    topo.run(net.host_ns, ["ip", "tuntap", "add", "dev", net.vm_tap, "mode", "tap"])
    topo.attach_to_bridge(net.vm_tap, net.host_ns, net.bridge)
    topo.run(net.host_ns, ["ip", "link", "set", net.vm_tap, "up"])


def wait_for_agent(ns: str, address: str, key: bytes, *, alive, story, timeout: float,
                   pause: float = 1.0) -> dict:
    """The hello of the agent a booting guest starts, asked from netns `ns` until it answers;
    RuntimeError with `story()` if the guest ends first (`alive()` false) or `timeout` passes."""
    from vnet import netns
    from vnet.protocol import connect

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the guest ended before its agent answered:\n{story()}")
        try:
            with netns.enter(ns):
                ch = connect(address, key, "agent", timeout=5)
            try:
                return ch.request({"type": "hello"}, ("hello",))
            finally:
                ch.close()
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
            time.sleep(pause)
    raise RuntimeError(f"the guest's agent did not answer in {timeout:.0f} s ({last}):\n{story()}")


def run(ctx: DemoContext) -> DemoResult:
    from vnet.topology import Topology, TopologyError

    ready = prepare(ctx, NAME)
    if isinstance(ready, DemoResult):
        return ready
    out, shared, other = ready
    n = REQUESTS[bool(ctx.quick)]
    runs = [tl._Run("alone", False, out / "alone.vnt"), tl._Run("with-hog", True, out / "with-hog.vnt")]
    files: list[Path] = []
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    procs = tl._Procs()
    prefix = ""
    guest = None
    ctx.progress("topology", 0.01)
    try:
        with Topology() as topo:
            prefix = topo.prefix
            net = tl._build(topo)
            add_tap(topo, net)
            try:
                ctx.progress("booting the QEMU guest (software emulation)", 0.03)
                guest = _Guest(procs, net, net.vm_tap, out)
                timings["boot"] = round(guest.wait_echo(BOOT_TIMEOUT), 1)
                guest.find_threads()
                guest.pin(shared, other)
                ctx.progress(f"warming up the guest ({WARM_UP} requests)", 0.35)
                _client(procs, net, other, WARM_UP)
                for i, r in enumerate(runs):
                    base = 0.4 + 0.25 * i
                    t = time.monotonic()
                    _measure(procs, net, guest, r, n, shared, other,
                             lambda what, f, r=r, base=base: ctx.progress(f"{r.label}: {what}", base + 0.25 * f))
                    timings[r.label] = round(time.monotonic() - t, 2)
                    files.append(r.trace)
            finally:
                if guest is not None:
                    ctx.progress("stopping the guest", 0.9)
                    guest.stop(procs)
    except (RuntimeError, TopologyError, OSError, subprocess.SubprocessError) as e:
        return tl.could_not_run(NAME, e, files, prefix)
    finally:
        procs.close()
    t = time.monotonic()
    tables = {}
    for i, r in enumerate(runs):
        ctx.progress(f"{r.label}: analysis", 0.92 + 0.03 * i)
        r.report, tables[r.label] = _analyse(r)
        files += tl._write_run(r, out, INTERVAL_S)
    timings["analysis"] = round(time.monotonic() - t, 2)
    if not ctx.quick:
        from vnet.analysis.plots import plot_all

        try:
            files += plot_all(tables["with-hog"], out / "plots-with-hog")
        except Exception as e:  # matplotlib missing: the numbers stand without the pictures
            if ctx.verbose:
                print(f"vnet demo: no plots: {e}", file=sys.stderr)
    return tl.finish(ctx, NAME, out, _judge(*runs, guest), t0=t0, timings=timings, files=files,
                     extra_files=(out / "guest.log", out / "qemu.log"),
                     params={"requests": n, "interval_s": INTERVAL_S, "vcpu_cpu": shared, "other_cpu": other,
                             "warm_up": WARM_UP, "topology_prefix": prefix})
