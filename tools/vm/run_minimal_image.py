#!/usr/bin/env python3
"""Boot the minimal Debian image built by tools/vm/minimal_image.sh as the guest's
root filesystem (Debian's 6.1 kernel, qemu without KVM, virtme-ng) and run a real
`vnet trace` inside it; exit 0 when it traced 4 valid events.

    tools/vm/minimal_image.sh tools/vm/cache/minimal-image dist/vnet-*.whl
    tools/vm/run_minimal_image.py --image tools/vm/cache/minimal-image

Nothing of the host's root filesystem is visible in the guest: its root is
IMAGE.ext4 (the image directory as an ext4 filesystem) attached read-only over
virtio-blk; the guest writes only to tmpfs overlays (/etc, /usr, /var, /tmp...),
so the image is never modified. The kernel's modules (veth, sch_ingress...) are
lent by the host read-only (virtme-ng does that for a root disk); the results
directory is the guest's /mnt. (Booting the directory itself over 9p, `vng
--root`, works too but is unusable: every Python start in the emulated guest
then takes about a minute, against 5 s from the ext4 disk.)

Inside the guest (GUEST_SCRIPT): `vnet --version`, `vnet doctor`, two network
namespaces joined by a veth pair (iproute2), `vnet trace -i NS/veth -c 4 --json`
in the background while a Python one-liner sends UDP datagrams from that
namespace; then the host checks RESULTS/events.jsonl.

Results: RESULTS/guest.log (the guest's console), guest.sh (what it ran),
exitcode (the guest script's), version.txt, doctor.txt, doctor.rc,
events.jsonl, trace.err, trace.rc, compilers.txt, timings.txt, and
summary.json (what the host concluded, with timings).

Exit codes: 0 passed; 1 the guest ran but a check failed (see the output);
124 the guest ran past --timeout (qemu killed); 125 the guest never reported
(boot failure: read guest.log).
Needs root, tools/vm/setup.sh (qemu, the 6.1 kernel, virtme-ng).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run_in_guest import boot, find_kernel, find_vng  # noqa: E402  (same kernel, vng and runner as the VM suite)

DEFAULT_IMAGE = HERE / "cache" / "minimal-image"
DEFAULT_RESULTS = HERE / "results" / "minimal-image"
GUEST_RESULTS = "/mnt"  # exists in every Debian root; the results dir is mounted there
TRACED = "vnimg-a/veth-a"  # NETNS/IFACE that GUEST_SCRIPT traces
FAILED, TIMED_OUT, NO_RESULT = 1, 124, 125
EVENT_KEYS = {"ts_ns", "probe", "ifname", "ifindex", "dir", "len", "proto", "src", "dst", "sport", "dport", "pkt_id"}
STALE = ("guest.log", "guest.sh", "exitcode", "version.txt", "doctor.txt", "doctor.rc", "events.jsonl",
         "trace.err", "trace.rc", "compilers.txt", "timings.txt", "summary.json")

# Runs in the image's bash; everything it needs is in the image (iproute2, python3, vnet).
GUEST_SCRIPT = r"""#!/bin/bash
# Written by tools/vm/run_minimal_image.py; runs inside the minimal image.
set -u
R=__RESULTS__
NS_A=vnimg-a NS_B=vnimg-b IP_A=10.203.0.1 IP_B=10.203.0.2 PORT=5555
t() { echo "$1 $(cut -d' ' -f1 /proc/uptime)" >> $R/timings.txt; }
t script_start
echo "vnet-image: guest up, kernel $(uname -r), root: $(grep ' / ' /proc/mounts | head -1)"
for c in cc gcc clang c89 c99 tcc g++ c++; do command -v "$c"; done > $R/compilers.txt
vnet --version > $R/version.txt 2>&1 || echo "vnet --version failed" >> $R/version.txt
t version_done
echo "vnet-image: vnet doctor"
vnet doctor > $R/doctor.txt 2>&1; echo $? > $R/doctor.rc
t doctor_done
cat $R/doctor.txt
# tcpdump expressions need libpcap, which a minimal image may lack: one clear line then.
vnet trace --dump-filter 'udp and port 53' > $R/pcap.txt 2>&1; echo $? > $R/pcap.rc

# Two "VMs": network namespaces joined by a veth pair. No IPv6 and static ARP, so the
# only packets on the wire are the datagrams sent below (and the ICMP errors they cause).
set -e
for ns in $NS_A $NS_B; do
  ip netns add $ns
  ip netns exec $ns sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6'
  ip -n $ns link set lo up
done
ip -n $NS_A link add veth-a type veth peer name veth-b netns $NS_B
ip -n $NS_A addr add $IP_A/24 dev veth-a
ip -n $NS_B addr add $IP_B/24 dev veth-b
ip -n $NS_A link set veth-a up
ip -n $NS_B link set veth-b up
mac() { ip -n $1 -br link show dev $2 | awk '{print $3}'; }
ip -n $NS_A neigh replace $IP_B lladdr "$(mac $NS_B veth-b)" dev veth-a nud permanent
ip -n $NS_B neigh replace $IP_A lladdr "$(mac $NS_A veth-a)" dev veth-b nud permanent
set +e
t topology_done

echo "vnet-image: vnet trace -i $NS_A/veth-a -c 4 --json"
timeout 240 vnet trace -i $NS_A/veth-a -c 4 --json > $R/events.jsonl 2> $R/trace.err &
tracer=$!
for _ in $(seq 240); do
  grep -q 'vnet: tracing ' $R/trace.err 2>/dev/null && break
  kill -0 $tracer 2>/dev/null || break
  sleep 0.5
done
t trace_started
ip netns exec $NS_A python3 -c "
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(1200):
    try:
        s.sendto(b'vnet-minimal-image-%04d' % i, ('$IP_B', $PORT))
    except OSError:
        pass
    time.sleep(0.2)
" &
sender=$!
wait $tracer; echo $? > $R/trace.rc
t trace_done
kill $sender 2>/dev/null; wait $sender 2>/dev/null
cat $R/trace.err
echo "vnet-image: $(wc -l < $R/events.jsonl) events"
rc=0
[ "$(cat $R/doctor.rc)" = 0 ] || rc=1
[ "$(cat $R/trace.rc)" = 0 ] || rc=1
[ -s $R/compilers.txt ] && rc=1
echo $rc > $R/exitcode
"""


def check(results: Path, spec: str) -> list[str]:
    """What is wrong with the guest's results (empty: passed)."""
    problems = []

    def read(name: str) -> str:
        p = results / name
        return p.read_text(errors="replace").strip() if p.is_file() else ""

    if read("doctor.rc") != "0":
        problems.append(f"vnet doctor exited {read('doctor.rc') or '?'}:\n{read('doctor.txt')}")
    if read("compilers.txt"):
        problems.append(f"compilers in the image: {read('compilers.txt').split()}")
    if read("trace.rc") != "0":
        problems.append(f"vnet trace exited {read('trace.rc') or '?'}:\n{read('trace.err')}")
    events = []
    for line in read("events.jsonl").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            problems.append(f"not JSON: {line!r}")
            continue
        missing = EVENT_KEYS - ev.keys() if isinstance(ev, dict) else EVENT_KEYS
        if missing:
            problems.append(f"event lacks {sorted(missing)}: {line}")
        elif not re.fullmatch(r"[0-9a-f]{16}", str(ev["pkt_id"])):
            problems.append(f"bad pkt_id: {line}")
        elif not str(ev["probe"]).startswith(f"dev:{spec}:"):
            problems.append(f"event from another probe than dev:{spec}: {line}")
        else:
            events.append(ev)
    if len(events) != 4:
        problems.append(f"expected 4 valid events, got {len(events)}")
    elif not any(e["proto"] in ("udp", 17) and e["dport"] == 5555 for e in events):
        problems.append("no event for the UDP datagrams sent to port 5555")
    return problems


def timings(results: Path) -> dict[str, float]:
    """Guest uptime (s) at each step of GUEST_SCRIPT."""
    out = {}
    p = results / "timings.txt"
    for line in (p.read_text().splitlines() if p.is_file() else []):
        name, _, value = line.partition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=str(DEFAULT_IMAGE),
                    help="the image directory given to minimal_image.sh (IMAGE.ext4 is booted)")
    ap.add_argument("--kernel", default="/boot/vmlinuz-6.1.*-amd64", help="guest kernel (a glob: newest wins)")
    ap.add_argument("--memory", default="2G")
    ap.add_argument("--cpus", default="2")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for boot + run; qemu is killed after")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="host directory, the guest's /mnt")
    ap.add_argument("--vng", default=None, help="virtme-ng's vng (default: tools/vm/.venv/bin/vng)")
    ap.add_argument("--dry-run", action="store_true", help="print the vng command and exit")
    args = ap.parse_args()

    if os.geteuid() != 0 and not args.dry_run:
        sys.exit("run_minimal_image: needs root (qemu's 9p exports, eBPF in the guest as root)")
    image = Path(args.image).resolve()
    disk = image.with_name(image.name + ".ext4")
    if not disk.is_file():
        sys.exit(f"run_minimal_image: no {disk} (build it with tools/vm/minimal_image.sh {image} WHEEL)")
    kernel = find_kernel(args.kernel)
    vng = find_vng(args.vng)
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    for stale in STALE:
        (results / stale).unlink(missing_ok=True)
    script = results / "guest.sh"
    script.write_text(GUEST_SCRIPT.replace("__RESULTS__", GUEST_RESULTS))
    script.chmod(0o755)

    # -v: the image has no udev, so virtme-ng-init finds no virtio-serial ports for the
    # command's I/O and falls back to the serial console, which only -v shows;
    # loglevel=1 keeps the kernel's messages off it.
    # --force-9p: the host's qemu virtiofsd (C) fails to start; trying it costs ~15 s per export.
    # No --rw: the disk is attached read-only.
    cmd = [vng, "-v", "--disable-kvm", "--disable-microvm", "--force-9p", "--memory", args.memory,
           "--cpus", args.cpus, "--run", kernel, "--root-disk", str(disk), "--root-fstype", "ext4",
           "--cwd", "/", "--rwdir", f"{GUEST_RESULTS}={results}", "--append", "loglevel=1",
            "--exec", f"bash {GUEST_RESULTS}/guest.sh"]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0

    print(f"vnet-image: booting {kernel} (no KVM, {args.memory}, {args.cpus} CPUs) on {disk} (read-only)",
          flush=True)
    returncode, timed_out, elapsed = boot(cmd, vng, results / "guest.log", args.timeout, "vnet-image")

    steps = timings(results)
    ec_file = results / "exitcode"
    if timed_out:
        code, problems = TIMED_OUT, [f"timed out after {args.timeout:.0f} s"]
    elif not ec_file.is_file():
        code, problems = NO_RESULT, [f"the guest did not report (vng exit {returncode}): read guest.log"]
    else:
        problems = check(results, TRACED)
        code = FAILED if problems or ec_file.read_text().strip() != "0" else 0
        if code and not problems:
            problems = [f"the guest script exited {ec_file.read_text().strip()}"]
    summary = {
        "passed": code == 0, "exit": code, "problems": problems, "root": str(disk),
        "wall_s": round(elapsed, 1), "kernel": kernel,
        # guest uptime when the command started: kernel boot + virtme-ng-init
        "boot_s": steps.get("script_start"),
        "guest_uptime_s": steps,
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for p in problems:
        print(f"vnet-image: FAIL: {p}", flush=True)
    boot_text = f"{summary['boot_s']:.0f} s" if summary["boot_s"] is not None else "?"
    print(f"vnet-image: {'passed' if code == 0 else 'FAILED'} in {elapsed:.0f} s (boot {boot_text}), "
          f"exit code {code}, results in {results}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
