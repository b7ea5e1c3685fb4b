#!/usr/bin/env python3
"""The collector's side of shipping alone: events chunks of 65,536 152-byte records (a
full ring batch, ~10 MB), ready in memory, sent as fast as they go over loopback TCP to a
running `vnet collect`, which verifies and writes them; delivered = its last ack. No ring,
no BPF, no agent: what the collector path can take, and what it costs it.

The sender is this process, with the channel of the code under test (as the agent's shipper
sends: one sendmsg per chunk, the MAC over it where it is); the collector a subprocess of that
code. With --compare-to REV, REV's code (a temporary worktree) runs alternated with this tree's;
--hmac also runs this tree with its fallback MAC (libcrypto's GMAC off in both processes).
Medians and min-max over rounds. No root needed. Numbers are of this machine at this moment.

Usage: collect.py [--rounds 5] [--chunks 40] [--compare-to REV] [--hmac]
"""

from __future__ import annotations

import argparse
import os
import shutil
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

EVENTS_PER_CHUNK = 65536
RECORD_BYTES = 152
NO_GMAC = "VNET_BENCH_NO_GMAC"  # --hmac: both ends act as if libcrypto had no AES-GCM


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(code: Path, chunks: int, blob: bytes, hmac_only: bool) -> tuple[float, float]:
    """(M events/s delivered, collector CPU µs per event) for one run."""
    connect = connect_for(code)
    tmp = Path(tempfile.mkdtemp(prefix="vnet-collect-bench-"))
    env = {**os.environ, "PYTHONPATH": str(code)}
    if hmac_only:
        env[NO_GMAC] = "1"
    col = None
    try:
        key_path = tmp / "key"
        key_path.write_text(os.urandom(32).hex() + "\n")
        key_path.chmod(0o600)
        address = f"127.0.0.1:{_free_port()}"
        # the collector subprocess: GMAC off for --hmac through a wrapper that patches the probe
        boot = ("import os, sys, runpy\n"
                f"if os.environ.get({NO_GMAC!r}):\n"
                "    import vnet.binding.crypto as c; c.available = lambda: False\n"
                "sys.argv = ['vnet'] + sys.argv[1:]\n"
                "runpy.run_module('vnet', run_name='__main__')\n")
        col = subprocess.Popen([sys.executable, "-c", boot, "collect", "--listen", address, "--key", str(key_path),
                                "--out", str(tmp / "out")], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=code)
        for line in col.stderr:
            if "collector listening on" in line:
                break
        else:
            raise RuntimeError(f"vnet collect did not start (exit {col.wait()})")
        threading.Thread(target=lambda: [None for _ in col.stderr], daemon=True).start()
        if hmac_only:
            import vnet.binding.crypto as crypto
            saved, crypto.available = crypto.available, lambda: False
        try:
            ch = connect(address, bytes.fromhex(key_path.read_text().strip()), "collector", limit=32 << 20)
        finally:
            if hmac_only:
                crypto.available = saved
        ch.request({"type": "open", "trace": "bench", "host": "h1", "header": {}}, ("opened",))
        done = threading.Event()

        def acks():
            while True:
                m = ch.recv(("ack", "ping"))
                if m["type"] == "ping":
                    ch.send({"type": "pong", "t": m.get("t"), "mono_ns": time.monotonic_ns(), "real_ns": time.time_ns()})
                elif m["seq"] >= chunks - 1:
                    done.set()
                    return

        reader = threading.Thread(target=acks, daemon=True)
        reader.start()
        cpu0, t0 = _cpu(col.pid), time.perf_counter()
        for seq in range(chunks):
            ch.send({"type": "chunk", "seq": seq, "chunk": {"kind": "events", "seq": seq, "count": EVENTS_PER_CHUNK}},
                    blob=blob)
        if not done.wait(120):
            raise RuntimeError("the collector did not acknowledge every chunk in 120 s")
        elapsed, cpu = time.perf_counter() - t0, _cpu(col.pid) - cpu0
        ch.close()
        events = chunks * EVENTS_PER_CHUNK
        return events / elapsed / 1e6, cpu / events * 1e6
    finally:
        if col is not None:
            col.terminate()
            col.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=40, help="chunks per run (65,536 events each)")
    ap.add_argument("--compare-to", metavar="REV", help="also run this git revision's code, alternated")
    ap.add_argument("--hmac", action="store_true", help="also run this tree with HMAC-SHA256 (GMAC off)")
    args = ap.parse_args()
    blob = os.urandom(EVENTS_PER_CHUNK * RECORD_BYTES)
    configs = [("this tree", ROOT, False)]
    if args.hmac:
        configs.append(("this tree, hmac", ROOT, True))
    tree = None
    if args.compare_to:
        tree = Path(tempfile.mkdtemp(prefix="vnet-collect-rev-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), args.compare_to],
                       check=True, capture_output=True)
        configs.append((args.compare_to, tree, False))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in configs}
    try:
        print(time.strftime("%Y-%m-%d %H:%M"), f"{os.cpu_count()} CPUs, {args.chunks} chunks of "
              f"{EVENTS_PER_CHUNK} x {RECORD_BYTES} bytes per run, {args.rounds} rounds")
        for r in range(args.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for name, code, hmac_only in order:
                rate, cpu = run(code, args.chunks, blob, hmac_only)
                results[name].append((rate, cpu))
                print(f"round {r + 1} {name:>16}: {rate:6.2f} M events/s delivered, collector {cpu:.3f} us/event",
                      flush=True)
    finally:
        if tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
            shutil.rmtree(tree.parent, ignore_errors=True)
    print(f"\n{'code':>16} | M events/s delivered, median (min-max) | collector CPU us/event")
    for name, rows in results.items():
        rates, cpus = [r for r, _ in rows], [c for _, c in rows]
        print(f"{name:>16} | {statistics.median(rates):6.2f} ({min(rates):.2f}-{max(rates):.2f})"
              f"                  | {statistics.median(cpus):.3f} ({min(cpus):.3f}-{max(cpus):.3f})")


if __name__ == "__main__":
    main()
