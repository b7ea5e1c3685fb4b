#!/usr/bin/env python3
"""Time to first event: `vnet trace` against `bpftrace -e`, from exec to the first
event line on stdout, on a veth pair in throwaway namespaces with one UDP packet
sent every ms; then the resident memory of a running `vnet agent`.

Commands (each waits for the first packet of this run's flow: UDP to PORT with a
payload of PAYLOAD bytes, received on ns2/ifB):
  vnet-dev   vnet trace -i NS2/ifB -d ingress -c 1 'udp and dst port PORT'
             (the device probe: a tcx link on the interface)
  vnet-tp    vnet trace -p net:netif_receive_skb --filter-netns NS2
             --filter-iface ifB -c 1 'udp and dst port PORT'   (the probe bpftrace uses)
  bpftrace   bpftrace -B none -e 'tracepoint:net:netif_receive_skb
             /str(args->name) == "ifB" && args->len == LEN/ { printf(...); exit(); }'

A round runs each once, in an order that rotates every round; a warm-up round
(page cache, Python bytecode) is run first and not counted. bpftrace 0.17 finds
tracepoints through tracefs: every command runs in a mount namespace of its own
with tracefs mounted at /sys/kernel/tracing (this host does not mount it; the
unshare and mount add ~1.5 ms to an exec, and are done for vnet too, for symmetry).

Every vnet process loads the eBPF objects committed at HEAD (VNET_BPF_DIR) and keeps its
bytecode in a folder of this run (written by the warm-up round), as an installed vnet would.

Memory: `vnet collect` and `vnet agent` started as in production; VmRSS/VmHWM of
the agent (/proc/PID/status) idle after start, after a dispatcher's hello (the
feature probes and catalog it answers with), while tracing ns2/ifB (both
directions) with the packet per ms, and after the trace stopped.

With --compare-to REV the vnet commands and the agent also run with the code of git
revision REV (a temporary worktree), alternated with this tree's.

Needs root and bpftrace (make bench-deps). Usage: first_event.py [--rounds 7] [--compare-to REV]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from revisions import connect_for  # noqa: E402  (tools/bench, beside this script)

PY = sys.executable
PORT = 47123
PAYLOAD = 123                # bytes: skb->len at netif_receive_skb is 20 + 8 + PAYLOAD
LEN = 20 + 8 + PAYLOAD
TIMEOUT_S = 30.0

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


def own_tracefs() -> None:
    """preexec_fn: a private mount namespace with tracefs at /sys/kernel/tracing."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "make / private")
    if not os.path.exists("/sys/kernel/tracing/events"):
        if _libc.mount(b"tracefs", b"/sys/kernel/tracing", b"tracefs", 0, None) != 0:
            raise OSError(ctypes.get_errno(), "mount tracefs")


def commands(ns2: str, if2: str) -> dict[str, list[str]]:
    expr = f"udp and dst port {PORT}"
    vnet = [PY, "-m", "vnet", "trace", "-c", "1"]
    return {
        "vnet-dev": vnet + ["-i", f"{ns2}/{if2}", "-d", "ingress", expr],
        "vnet-tp": vnet + ["-p", "net:netif_receive_skb", "--filter-netns", ns2, "--filter-iface", if2, expr],
        "bpftrace": ["bpftrace", "-B", "none", "-e",
                     f'tracepoint:net:netif_receive_skb /str(args->name) == "{if2}" && args->len == {LEN}/ '
                     '{ printf("%s len %d\\n", str(args->name), args->len); exit(); }'],
    }


def child_env(workdir: Path) -> dict[str, str]:
    """Python children keep their bytecode (in a folder of ours), as an installed vnet has it:
    the warm-up round writes it. (A development shell may say PYTHONDONTWRITEBYTECODE.)"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    return env


ENV: dict[str, str] = dict(os.environ)


def committed_objects(dest: Path) -> Path:
    """bpf/build/ as committed at HEAD, for every vnet process of this run (and of --compare-to):
    work in progress in the checkout does not change what the verifier gets."""
    dest.mkdir()
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", "HEAD", "bpf/build/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        (dest / Path(name).name).write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{name}"],
                                                            check=True, capture_output=True).stdout)
    return dest


def code_env(code: Path) -> dict[str, str]:
    """ENV for vnet processes that run the vnet package of `code` (this tree or a --compare-to worktree)."""
    return {**ENV, "PYTHONPATH": str(code)} if code != ROOT else ENV


def first_line(argv: list[str], want: str, code: Path = ROOT) -> tuple[float, str]:
    """Seconds from exec to the first stdout line containing `want` (the process is then ended)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=code, preexec_fn=own_tracefs, env=code_env(code))
    got: list[tuple[float, str]] = []

    def read() -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if want in line:
                got.append((time.monotonic() - t0, line))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(TIMEOUT_S)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if not got:
        raise RuntimeError(f"no event from {argv[:4]}... in {TIMEOUT_S} s (exit {proc.returncode}):\n"
                           + err.decode(errors="replace"))
    return got[0]


class Sender:
    """One UDP packet from ns1 to ns2:PORT every ms, until stopped."""

    def __init__(self, ns1: str, dst: str):
        from vnet.topology import in_netns

        with in_netns(ns1):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.dst = dst
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        payload = b"f" * PAYLOAD
        next_t = time.monotonic()
        while not self._stop.is_set():
            self.sock.sendto(payload, (self.dst, PORT))
            self.sent += 1
            next_t += 0.001
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def vm_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and what VmRSS is made of (RssAnon, RssFile, RssShmem), kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:", "RssShmem:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def _vnet(*args: str, code: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "vnet", *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=code, env=code_env(code))


def _wait_line(proc: subprocess.Popen, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if text in line:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"{proc.args[:4]}: no {text!r} (exit {proc.poll()})")


def agent_memory(ns2: str, if2: str, workdir: Path, trace_s: float, code: Path = ROOT) -> list[tuple[str, dict]]:
    from vnet.dispatch.spec import loads
    from vnet.protocol import new_key

    connect = connect_for(code)

    key_path = new_key(workdir / "key")
    key = bytes.fromhex(key_path.read_text().strip())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        col_addr = f"127.0.0.1:{s.getsockname()[1]}"
    sock = workdir / "agent.sock"
    collector = _vnet("collect", "--listen", col_addr, "--key", str(key_path), "--out", str(workdir / "out"), code=code)
    agent = _vnet("agent", "--listen", f"unix:{sock}", "--key", str(key_path), "--spool", str(workdir / "spool"),
                  "--host", "h1", code=code)
    out = []
    try:
        _wait_line(collector, "collector listening on")
        _wait_line(agent, "agent listening on")
        time.sleep(1.0)
        out.append(("idle, after start", vm_kb(agent.pid)))
        ch = connect(f"unix:{sock}", key, "agent")
        ch.request({"type": "hello"}, ("hello",))
        time.sleep(0.5)
        out.append(("idle, after a dispatcher's hello", vm_kb(agent.pid)))
        spec = loads(f"""
[trace]
name = "rss"
[collector]
address = "{col_addr}"
[[host]]
name = "h1"
agent = "unix:{sock}"
interfaces = ["{ns2}/{if2}"]
""")
        ch.request({"type": "start", "package": spec.control_package(spec.hosts[0])}, ("started",))
        peak_rss = 0
        deadline = time.monotonic() + trace_s
        while time.monotonic() < deadline:
            peak_rss = max(peak_rss, vm_kb(agent.pid)["VmRSS"])
            time.sleep(0.1)
        st = ch.request({"type": "status"}, ("status",))
        out.append((f"tracing {if2} (2 hooks), 1 packet/ms, {trace_s:.0f} s, {st['read']} events "
                    f"(VmRSS max sampled {peak_rss} kB)", vm_kb(agent.pid)))
        ch.request({"type": "stop"}, ("stopped",))
        ch.close()
        time.sleep(0.5)
        out.append(("idle, after the trace stopped", vm_kb(agent.pid)))
    finally:
        for p in (agent, collector):
            p.send_signal(signal.SIGTERM)
        for p in (agent, collector):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="vnet-dev,vnet-tp,bpftrace")
    ap.add_argument("--trace-seconds", type=float, default=5.0, help="how long the agent traces for the RSS reading")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--compare-to", metavar="REV", help="also run the vnet commands and the agent with this git "
                    "revision's code (a temporary worktree), alternated with this tree's")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("first_event.py needs root")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from vnet.topology import veth_pair

    workdir = Path(tempfile.mkdtemp(prefix="vnet-first-"))
    ENV.clear()
    ENV.update(child_env(workdir))
    ENV["VNET_BPF_DIR"] = str(committed_objects(workdir / "bpf"))
    times: dict[str, list[float]] = {}
    tree = workdir / "baseline"
    codes = {"": ROOT}
    try:
        if args.compare_to:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), args.compare_to],
                           check=True, capture_output=True)
            codes["@" + args.compare_to] = tree
        with veth_pair(93) as net:
            sender = Sender(net.ns1, net.ip2)
            try:
                cmds, code_of = {}, {}
                for k, v in commands(net.ns2, net.if2).items():
                    if k not in args.only.split(","):
                        continue
                    for label, code in codes.items() if k.startswith("vnet") else [("", ROOT)]:
                        cmds[k + label], code_of[k + label] = v, code
                if "bpftrace" in cmds:
                    version = subprocess.run(["bpftrace", "--version"], capture_output=True, text=True).stdout.strip()
                    print(f"{version}", flush=True)
                names = list(cmds)
                print(f"{time.strftime('%Y-%m-%d %H:%M')}, kernel {os.uname().release}, {os.cpu_count()} CPUs; "
                      f"warm-up round, then {args.rounds} rounds", flush=True)
                for rnd in range(args.rounds + 1):
                    k = rnd % len(names)
                    for name in names[k:] + names[:k]:
                        want = f"{PORT}" if name.startswith("vnet") else f"len {LEN}"
                        dt, line = first_line(cmds[name], want, code_of[name])
                        if rnd:
                            times.setdefault(name, []).append(dt)
                        print(f"{'round ' + str(rnd) if rnd else 'warm-up':>8} {name:>16}: {dt:.3f} s  {line[:90]}",
                              flush=True)
                print()
                print(f"{'command':>16} | time to first event, s: median (min-max)")
                for name, ts in times.items():
                    print(f"{name:>16} | {statistics.median(ts):.3f} ({min(ts):.3f}-{max(ts):.3f})")
                if "bpftrace" in times:
                    for name in times:
                        if name != "bpftrace":
                            print(f"{name} / bpftrace: {statistics.median(times[name]) / statistics.median(times['bpftrace']):.2f}x")
                for label, code in codes.items() if not args.no_memory else ():
                    print()
                    mem = workdir / f"mem{label.replace('@', '-')}"
                    mem.mkdir()
                    for what, kb in agent_memory(net.ns2, net.if2, mem, args.trace_seconds, code):
                        print(f"agent{label} {what}: VmRSS {kb['VmRSS'] / 1024:.1f} MiB (anon {kb['RssAnon'] / 1024:.1f}, "
                              f"file {kb['RssFile'] / 1024:.1f}, shmem {kb['RssShmem'] / 1024:.1f}), "
                              f"VmHWM {kb['VmHWM'] / 1024:.1f} MiB", flush=True)
            finally:
                sender.stop()
    finally:
        import shutil

        if tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
