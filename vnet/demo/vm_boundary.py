"""`vnet demo vm-boundary`: one timeline per packet across a hypervisor boundary.

The tail-latency-qemu scenario, traced from both sides at once: a vnet agent runs
inside the QEMU guest (Debian's 6.1 kernel, software emulation, its virtio NIC a
tap on the host bridge) and one on the host; one `vnet dispatch` spec drives both,
one `vnet collect` receives both::

    vm1 (netns): client --veth-- tap1 \\
                                       br0 (host netns: QEMU, collector, host agent)
    guest (QEMU): echo server, agent, virtio NIC --- tap2 /
    vm3 (netns): the hog              CPU B: QEMU's vCPU thread and, in the second run, the hog

Host: TC on the client's veth, its bridge port and the guest's tap (both ways), and
the run-queue waits of QEMU's threads. Guest (fentry, else kprobe, where a function):
the request from `net:napi_gro_receive_entry` (where virtio-net hands a frame to the
stack) and TC on its virtio NIC to the socket, `sock:udp_enqueue` (queued on the echo
server's socket) and `sock:udp_read` (the server takes it); the reply from `ip:output`
(its first point with whole headers, in the server's task) and TC to
`virtio:start_xmit`. The spec says the guest runs
on the host (`hypervisor = "hv"`), so QEMU's run-queue waits are joined with the
guest's segments too.
`vnet analyze --round-trip` then joins each request and its reply by pkt_id across
the two kernels, after putting the guest's clock on the collector's (the pings,
refined by the packets themselves: analysis.clocksync), so the hypervisor's own
segments appear: host tap -> guest virtio receive, guest virtio transmit -> host tap,
with the guest's own between them: receive -> socket -> read, and the server's turnaround
(read -> send) -> transmit.
With the hog on the vCPU thread's CPU the added tail must land in the segment where
the guest waits for its vCPU, explained by that thread's run-queue waits.

Needs what tail-latency-qemu needs (QEMU, the 6.1 kernel, virtme-ng).
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import DemoContext, DemoResult
from . import tail_latency as tl
from . import tail_latency_qemu as tq

NAME = "vm-boundary"
TITLE = "One timeline across the hypervisor boundary: a QEMU guest and its host traced together"

HV_IP = "10.199.0.254"            # the bridge's address: the guest reaches the collector there
AGENT_PORT, COLLECTOR_PORT = 7878, 7879
REQUESTS = {True: 1200, False: 3000}
AGENT_TIMEOUT = 300.0             # the guest's agent answering a hello
MIN_COMPLETE = 0.95               # answered round trips whose path crosses into the guest and back
MIN_ANSWERED = 0.99               # requests the guest answers before the client stops waiting
# + TC on its NIC: 7 events a round trip. The reply from its socket (ip:output: its first point
# with whole headers, in the echo server's task) to the driver; the request from the driver to
# the socket's queue and the server's read. Not skb:consume_skb: virtio-net frees sent packets
# with it too, after they left (the clock's refinement skips it: clocksync.AFTERWARDS), so it
# would be no delivery point and one more event per reply.
GUEST_SEND, GUEST_DELIVERY = "ip:output", "sock:udp_read"
GUEST_PROBES = (GUEST_SEND, "virtio:start_xmit", "net:napi_gro_receive_entry", "sock:udp_enqueue", GUEST_DELIVERY)
GUEST_SETTLE_S = 3.0              # the guest's agent loads its programs under emulation: let it finish

_GUEST = r'''
log() {{ echo "$(cut -d' ' -f1 /proc/uptime) $*" >> {log}; }}
log booted
{find_nic}log "nic '$IF'"
echo "$IF" > {folder}/guest-if
ip link set "$IF" up && ip addr add {ip}/24 dev "$IF" || log "ip failed"
{python} -m vnet agent --listen {ip}:{agent_port} --allow-remote --key {key} --host guest \
    --spool /tmp/vnet-spool >> {folder}/guest-agent.log 2>&1 &
AGENT=$!
log "agent started"
{echo}
log "echo server stopped"
kill -TERM $AGENT; wait $AGENT
log "agent stopped"
'''


class _Guest(tq._Guest):
    """tail_latency_qemu's guest, with a vnet agent beside its echo server."""

    def __init__(self, procs: tl._Procs, net: tl._Net, tap: str, folder: Path, key: Path):
        self.folder = folder
        log = shlex.quote(str(folder / "guest.log"))
        echo = tq.ECHO_SERVER.format(port=tl.ECHO_PORT, life=tq.GUEST_LIFE, stop=tq.STOP.decode(), log=log)
        script = _GUEST.format(find_nic=tq.FIND_VIRTIO_NIC, log=log, folder=shlex.quote(str(folder)), ip=tl.VM_IP,
                               echo=echo, python=shlex.quote(sys.executable), agent_port=AGENT_PORT,
                               key=shlex.quote(str(key)))
        super().__init__(procs, net, tap, folder, script)

    def story(self) -> str:
        f = self.folder / "guest-agent.log"
        agent = f.read_text(errors="replace")[-1500:] if f.exists() else "(none)"
        return super().story() + f"\nguest-agent.log: {agent.strip()}"


def _spec(path: Path, name: str, key: Path, sock: Path, net: tl._Net, guest_if: str, qemu_pid: int) -> Path:
    host_ifs = [f"{net.client_ns}/{net.client_if}", net.client_port, net.vm_tap]
    path.write_text(f"""
[trace]
name = "{name}"

[collector]
address = "{HV_IP}:{COLLECTOR_PORT}"
key = "{key}"

[filter]
proto = "udp"
port = {tl.ECHO_PORT}

[[host]]
name = "hv"
agent = "unix:{sock}"
interfaces = {json.dumps(host_ifs)}
probes = ["sched:runq"]
pids = [{qemu_pid}]

[[host]]
name = "guest"
agent = "{tl.VM_IP}:{AGENT_PORT}"
interfaces = ["{guest_if}"]
probes = {json.dumps(list(GUEST_PROBES))}
hypervisor = "hv"
""")
    return path


def _start(procs: tl._Procs, argv: list[str], ready: str, timeout: float, log: Path) -> subprocess.Popen:
    """A vnet process whose stderr goes to `log`, once that says `ready`."""
    f = open(log, "wb")
    p = procs.start(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready in log.read_text(errors="replace"):
            return p
        if p.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"{argv[5:7]} did not report {ready!r}: {log.read_text(errors='replace')[-800:]}")


def _measure(procs, net, guest: _Guest, run: tl._Run, n: int, shared: int, other: int, spec: Path, out: Path,
             step) -> None:
    step("dispatching the trace to both agents", 0.0)
    log = out / f"dispatch-{run.label}.log"
    ns_vnet = ["ip", "netns", "exec", net.host_ns, "taskset", "-c", str(other), sys.executable, "-m", "vnet"]
    dispatch = procs.start(ns_vnet + ["dispatch", str(spec), "--json"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=open(log, "wb"))
    deadline = time.monotonic() + 120
    while not all(f"{h}: tracing" in log.read_text(errors="replace") for h in ("hv", "guest")):
        if dispatch.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vnet dispatch did not start both hosts: {log.read_text(errors='replace')[-800:]}")
        time.sleep(0.1)
    time.sleep(GUEST_SETTLE_S)
    hog = None
    life = n * tq.INTERVAL_S + 40.0
    if run.hog:
        step(f"starting {tl.HOG_COMM}", 0.2)
        hog, hello = tl._child(procs, net.hog_ns, "hog", shared, life, tl.HOG_COMM)
        run.hog_pid = hello["pid"]
        time.sleep(0.3)
    step(f"{n} requests, 1 per {tq.INTERVAL_S * 1000:.0f} ms", 0.3)
    run.rtt_ns = tq._client(procs, net, other, n)
    if hog is not None:
        procs.stop(hog)
    step("stopping the trace (both agents ship the rest)", 0.9)
    time.sleep(0.5)
    dispatch.send_signal(signal.SIGINT)
    try:
        stdout, _ = dispatch.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        procs.stop(dispatch)
        raise RuntimeError(f"vnet dispatch did not stop: {log.read_text(errors='replace')[-800:]}") from None
    procs.procs.remove(dispatch)
    if dispatch.returncode != 0:
        raise RuntimeError(f"vnet dispatch exited {dispatch.returncode}: {log.read_text(errors='replace')[-800:]}")
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    run.lost_events = sum(int(v) for v in (summary.get("losses") or {}).values())
    run.tracer_stderr = log.read_text(errors="replace")


def _analyse(folder: Path):
    """`vnet analyze FOLDER --proto udp --dport ECHO_PORT --round-trip`."""
    from vnet.analysis.report import analyze
    from vnet.analysis.roundtrip import describe, reverse, round_trips
    from vnet.analysis.stream import read_table, sync_tables

    flow = tl._request_flow()
    req = read_table([folder], flow=flow, sync_clocks=False)
    rep = read_table([folder], flow=reverse(flow), sync_clocks=False)
    sync_tables([req, rep])   # the requests and the replies cross both ways: together they fix the clock
    table, pairing = round_trips(req, rep)
    report = analyze(table, slowest=5)
    report["round_trip"] = pairing
    report["verdict"] = describe(pairing) + " " + report["verdict"]
    return report, table


def _is_guest(hop: str) -> bool:
    return hop.startswith("[guest] ")


def _boundary(report: dict, answered: int) -> dict:
    """What crossed the boundary: round trips whose path goes into the guest and back (a
    share of those the client saw answered: a request the guest never answered in time,
    on a busy machine, made no round trip to join), the hypervisor's segments (a host hop
    next to a guest hop) with their bounds, the clock."""
    paths = report.get("paths") or []
    crossing = [p for p in paths if any(_is_guest(h) for h in p["hops"]) and not _is_guest(p["hops"][0])
                and not _is_guest(p["hops"][-1])]
    segs = [s for s in report.get("segments") or [] if _is_guest(s["from"]) != _is_guest(s["to"])]
    guest = next((h for h in report.get("hosts") or [] if h["host"] == "guest"), {})
    main = paths[0] if paths else None
    stats = {(s["from"], s["to"]): s for s in report.get("segments") or []}
    along = list(zip(main["hops"], main["hops"][1:])) if main else []
    return {
        "round_trips_crossing": sum(p["count"] for p in crossing),
        "answered": answered,
        "complete_share": sum(p["count"] for p in crossing) / answered if answered else 0.0,
        "hypervisor_segments": [{k: s[k] for k in ("from", "to", "count", "min_ns", "p50_ns", "p99_ns", "max_ns",
                                                   "clock_error_ns")} for s in segs],
        "negative_beyond_bound": [f"{s['from']} -> {s['to']}" for s in segs
                                  if s["min_ns"] < -(s["clock_error_ns"] or 0)],
        "guest_clock": guest.get("clock"),
        "main_path": main["hops"] if main else None,
        # every segment of the main path, the guest's own (socket <-> driver) among them
        "main_segments": [{"from": a, "to": b, **{k: stats[a, b][k] for k in ("count", "p50_ns", "p99_ns")}}
                          for a, b in along if (a, b) in stats],
        "main_e2e": {k: main["e2e"][k] for k in ("p50_ns", "p99_ns", "p999_ns")} if main else None,
        "tail_largest_segment": (f"{main['tail']['segments'][main['tail']['largest']]['from']} -> "
                                 f"{main['tail']['segments'][main['tail']['largest']]['to']}") if main else None,
    }


def _judge(alone: tl._Run, hog: tl._Run, guest: _Guest, n: int) -> tuple[dict, str, bool, str]:
    ra, rh = tl._rtt_stats(alone), tl._rtt_stats(hog)
    ba, bh = _boundary(alone.report or {}, ra["replies"]), _boundary(hog.report or {}, rh["replies"])
    sched = (hog.report or {}).get("sched") or {}
    threads = sched.get("threads") or []
    vcpu = [t for t in threads if t["waiting"].startswith(tq.VCPU_COMM)]
    top = vcpu[0] if vcpu else (threads[0] if threads else {})
    ratios = {q: tl._ratio(rh[f"{q}_ns"], ra[f"{q}_ns"]) for q in ("p50", "p99", "p999")}
    share = sched.get("share_of_tail") or 0.0
    numbers = {"rtt": {"alone": ra, "with_hog": rh, "ratio": ratios},
               "boundary": {"alone": ba, "with_hog": bh},
               "sched": {"share_of_tail": share, "waiting": top.get("waiting"),
                         "cpu_taken_by": top.get("cpu_taken_by"), "threads": threads},
               "qemu": {"pid": guest.qemu_pid, "vcpu_tid": guest.vcpu_tid},
               "events_lost": {"alone": alone.lost_events, "with_hog": hog.lost_events}}
    problems = []
    for label, b, r in (("alone", ba, ra), ("with the hog", bh, rh)):
        if r["replies"] < MIN_ANSWERED * r["requests"]:
            problems.append(f"{label}: the guest answered only {r['replies']} of {r['requests']} requests in time")
        if b["complete_share"] < MIN_COMPLETE:
            problems.append(f"{label}: only {b['complete_share'] * 100:.1f}% of the {b['answered']} answered round "
                            f"trips were seen crossing into the guest and back")
        if b["negative_beyond_bound"]:
            problems.append(f"{label}: negative hypervisor segments beyond the clock bound: "
                            f"{', '.join(b['negative_beyond_bound'])}")
        if not b["hypervisor_segments"]:
            problems.append(f"{label}: no segment between a host hop and a guest hop")
        seen = {h.removeprefix("[guest] ").split(" ")[0] for h in b["main_path"] or [] if _is_guest(h)}
        if not {GUEST_SEND, GUEST_DELIVERY} <= seen:
            problems.append(f"{label}: the main path lacks the guest's socket hops ({GUEST_DELIVERY}, {GUEST_SEND})")
    tail_ratio = max((r for r in (ratios["p99"], ratios["p999"]) if r is not None), default=None)
    if tail_ratio is None or tail_ratio < tq.MIN_TAIL_RATIO:
        problems.append(f"the hog did not add a clear tail (p99 x{ratios['p99']}, p99.9 x{ratios['p999']})")
    if share < tq.MIN_SHARE:
        problems.append(f"run-queue waits explain only {share * 100:.0f}% of the tail")
    if not vcpu:
        problems.append("the vCPU thread was not among the threads waiting")
    elif not (top.get("cpu_taken_by") or "").startswith(tl.HOG_COMM):
        problems.append(f"the vCPU thread waited mostly behind {top.get('cpu_taken_by')}, not {tl.HOG_COMM}")
    busy = (ra["p99_ns"] or 0) >= tq.BUSY_TAIL_NS
    numbers["baseline_noise"] = {"busy": busy, "rtt_p99_ns": ra["p99_ns"]}
    if busy and problems:
        problems.append(f"the machine was busy: without the hog the round trip's p99 was already "
                        f"{tl._us(ra['p99_ns'])}; run it on a quieter machine")
    ok = not problems
    us = tl._us
    clock = bh["guest_clock"] or {}
    words = (f"Round trip client -> QEMU guest (echo) -> client, traced on the host and inside the guest: "
             f"{bh['complete_share'] * 100:.0f}% of {bh['answered']} round trips ({n} requests) joined by pkt_id "
             f"across the boundary. "
             f"The guest's clock: {clock.get('source', '?')}, offset {clock.get('offset_ns')} ns, drift "
             f"{clock.get('drift_ppm')} ppm, ±{us(clock.get('error_ns'))}. Hypervisor segments (with the hog): "
             + "; ".join(f"{s['from']} -> {s['to']} p50 {us(s['p50_ns'])} p99 {us(s['p99_ns'])}"
                         for s in bh["hypervisor_segments"][:4])
             + ". Inside the guest, socket to driver (with the hog): "
             + "; ".join(f"{s['from'].removeprefix('[guest] ')} -> {s['to'].removeprefix('[guest] ')} p50 "
                         f"{us(s['p50_ns'])}" for s in bh["main_segments"]
                         if _is_guest(s["from"]) and _is_guest(s["to"]))
             + f". Round trip alone p99 {us(ra['p99_ns'])}, with {tl.HOG_COMM} on the vCPU's CPU p99 "
               f"{us(rh['p99_ns'])} (x{ratios['p99']}); the tail's largest segment: {bh['tail_largest_segment']}.")
    if sched.get("slow_packets"):
        words += (f" Run-queue waits explain {share * 100:.0f}% of the slow round trips' time: "
                  f"{top.get('waiting', '?')} waited while {top.get('cpu_taken_by', '?')} had its CPU.")
    words += (" The added tail is QEMU's vCPU thread waiting for its CPU, seen from both sides of the boundary."
              if ok else " Not the expected answer: " + "; ".join(problems) + ".")
    return numbers, words, ok, "; ".join(problems)


def available() -> str | None:
    return tq.available()


def run(ctx: DemoContext) -> DemoResult:
    from vnet.protocol import load_key, new_key
    from vnet.topology import Topology, TopologyError

    ready = tq.prepare(ctx, NAME)
    if isinstance(ready, DemoResult):
        return ready
    out, shared, other = ready
    n = REQUESTS[bool(ctx.quick)]
    collected = out / "collected"
    runs = [tl._Run("alone", False, collected / "alone"), tl._Run("with-hog", True, collected / "with-hog")]
    key_path = new_key(out / "key")
    key = load_key(key_path)
    files: list[Path] = []
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    procs = tl._Procs()
    guest = None
    prefix = ""
    ctx.progress("topology", 0.01)
    try:
        with Topology() as topo:
            prefix = topo.prefix
            net = tl._build(topo)
            topo.add_address(net.bridge, net.host_ns, f"{HV_IP}/24")
            tq.add_tap(topo, net)
            try:
                ns_vnet = ["ip", "netns", "exec", net.host_ns, "taskset", "-c", str(other), sys.executable, "-m",
                           "vnet"]
                _start(procs, ns_vnet + ["collect", "--listen", f"{HV_IP}:{COLLECTOR_PORT}", "--allow-remote",
                                         "--key", str(key_path), "--out", str(collected)],
                       "collector listening on", 30, out / "collector.log")
                sock = out / "hv.sock"
                _start(procs, ns_vnet + ["agent", "--listen", f"unix:{sock}", "--key", str(key_path), "--host", "hv",
                                         "--spool", str(out / "spool")], "agent listening on", 30, out / "agent.log")
                ctx.progress("booting the QEMU guest (software emulation) with its agent", 0.03)
                guest = _Guest(procs, net, net.vm_tap, out, key_path)
                timings["boot"] = round(guest.wait_echo(tq.BOOT_TIMEOUT), 1)
                hello = tq.wait_for_agent(net.host_ns, f"{tl.VM_IP}:{AGENT_PORT}", key, story=guest.story,
                                          alive=lambda: guest.proc.poll() is None, timeout=AGENT_TIMEOUT)
                timings["guest_agent"] = round(time.monotonic() - t0, 1)
                guest_if = (out / "guest-if").read_text().strip()
                guest.find_threads()
                guest.pin(shared, other)
                ctx.progress(f"warming up the guest ({tq.WARM_UP} requests)", 0.3)
                tq._client(procs, net, other, tq.WARM_UP)
                for i, r in enumerate(runs):
                    base = 0.35 + 0.27 * i
                    t = time.monotonic()
                    spec = _spec(out / f"spec-{r.label}.toml", r.label, key_path, sock, net, guest_if, guest.qemu_pid)
                    _measure(procs, net, guest, r, n, shared, other, spec, out,
                             lambda what, f, r=r, base=base: ctx.progress(f"{r.label}: {what}", base + 0.27 * f))
                    timings[r.label] = round(time.monotonic() - t, 2)
                    files += sorted(r.trace.glob("*.vnt"))
            finally:
                if guest is not None:
                    ctx.progress("stopping the guest", 0.9)
                    guest.stop(procs)
    except (RuntimeError, TopologyError, OSError, subprocess.SubprocessError, ValueError) as e:
        return tl.could_not_run(NAME, e, files, prefix)
    finally:
        procs.close()
    t = time.monotonic()
    for i, r in enumerate(runs):
        ctx.progress(f"{r.label}: analysis", 0.92 + 0.03 * i)
        r.report, _ = _analyse(r.trace)
        (out / f"{r.label}.analysis.json").write_text(json.dumps(r.report, default=tl._plain, indent=1) + "\n")
        files.append(out / f"{r.label}.analysis.json")
    timings["analysis"] = round(time.monotonic() - t, 2)
    return tl.finish(ctx, NAME, out, _judge(*runs, guest, n), t0=t0, timings=timings, files=files,
                     extra_files=(out / "guest.log", out / "qemu.log"),
                     params={"requests": n, "interval_s": tq.INTERVAL_S, "vcpu_cpu": shared, "other_cpu": other,
                             "guest_kernel": hello.get("kernel"), "topology_prefix": prefix})
