"""A distributed trace across a real hypervisor boundary: one agent on this
host, one inside a 6.1 guest (qemu, software emulation) whose virtio NIC sits
on a host tap, one collector, one `vnet dispatch` spec. Packets sent from the
host side to the guest are seen at the tap's TC egress on the host and at the
guest's NIC and receive tracepoint, with the same pkt_id; the guest's file
says it came from the other kernel, with its clock measured."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


from kernel_support import VnetProcess
from vnet import netns
from vnet.collector.tracefile import TraceFileReader
from vnet.demo.tail_latency_qemu import FIND_VIRTIO_NIC, wait_for_agent
from vnet.protocol import load_key, new_key
from vnet.topology import Topology, send_udp

ROOT = Path(__file__).resolve().parents[2]
HOST_IP, GUEST_IP = "10.211.0.1", "10.211.0.2"
PORT = 6123
SENT = 30
GUEST_TIMEOUT = 480


def _guest_script(results: Path, key: Path) -> str:
    """Runs in the guest: bring up the virtio NIC, serve as an agent until the host says stop.

    udev loads virtio_net and renames eth0 asynchronously while this already runs, so
    wait for udev to settle and pick the NIC by its driver (bounded), logging each step
    with its time to RESULTS/steps.log for the failure message."""
    py = shlex.quote(str(ROOT / ".venv" / "bin" / "python"))
    r = shlex.quote(str(results))
    script = f"""
step() {{ echo "$(cut -d' ' -f1 /proc/uptime) $*" >> {r}/steps.log; }}
step booted
{FIND_VIRTIO_NIC}step "nic: '$IF'"
echo $IF > {r}/guest-if
ip link set $IF up && ip addr add {GUEST_IP}/24 dev $IF || step "ip failed: $?"
ip -o addr >> {r}/steps.log
{py} -m vnet agent --listen {GUEST_IP}:7878 --allow-remote --key {shlex.quote(str(key))} \
    --host guest --spool /tmp/vnet-spool > {r}/agent.log 2>&1 &
AGENT=$!
step "agent started"
{py} -c {shlex.quote(STOP_WAITER)} || step "stop waiter failed"
step "stopping"
kill -TERM $AGENT; wait $AGENT
"""
    (results / "guest.sh").write_text(script)
    return f"sh {r}/guest.sh"


# The guest waits for the host to connect here, then stops its agent (a file on the
# shared folder would not do: the guest does not see the host's new files promptly).
STOP_WAITER = (f"import socket; s = socket.create_server(('{GUEST_IP}', 7999)); s.settimeout({GUEST_TIMEOUT}); "
               "s.accept()")


def _stop_guest(ns: str) -> None:
    import socket

    try:
        with netns.enter(ns):
            socket.create_connection((GUEST_IP, 7999), timeout=5).close()
    except OSError:
        pass


def _guest_story(tmp_path: Path) -> str:
    """What the guest and qemu said, for a failure message."""
    parts = []
    for name in ("guest/steps.log", "guest/agent.log", "qemu.log"):
        f = tmp_path / name
        text = f.read_text(errors="replace")[-3000:] if f.exists() else "(none)"
        parts.append(f"--- {name}:\n{text}")
    return "\n".join(parts)


def test_one_spec_traces_the_host_tap_and_the_guest_nic(tmp_path):
    results = tmp_path / "guest"
    results.mkdir()
    key_path = new_key(results / "key")
    key = load_key(key_path)
    with Topology() as topo:
        hv = topo.add_netns("hv")
        topo.run(hv, ["ip", "tuntap", "add", "dev", "vtap0", "mode", "tap"])
        topo.run(hv, ["ip", "addr", "add", f"{HOST_IP}/24", "dev", "vtap0"])
        topo.run(hv, ["ip", "link", "set", "vtap0", "up"])
        guest = subprocess.Popen(
            ["ip", "netns", "exec", hv, sys.executable, str(ROOT / "tools/vm/run_in_guest.py"), "--results",
             str(results), "--net-tap", "vtap0", "--timeout", str(GUEST_TIMEOUT),
             "--shell-cmd", _guest_script(results, key_path)],
            stdout=open(tmp_path / "qemu.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs = []
        t0 = time.monotonic()
        marks = {}
        try:
            hello = wait_for_agent(hv, f"{GUEST_IP}:7878", key, alive=lambda: guest.poll() is None,
                                   story=lambda: _guest_story(tmp_path), timeout=300, pause=2)
            marks["guest agent up"] = time.monotonic() - t0
            assert hello["host"] == "guest" and hello["kernel"].startswith("6.1."), hello
            assert hello["kernel"] != os.uname().release  # a real second kernel
            guest_if = (results / "guest-if").read_text().strip()

            out = tmp_path / "out"
            ns_exec = ["ip", "netns", "exec", hv, sys.executable, "-m", "vnet"]
            collector = VnetProcess(argv=ns_exec + ["collect", "--listen", f"{HOST_IP}:7879", "--allow-remote",
                                                    "--key", str(key_path), "--out", str(out)])
            procs.append(collector)
            collector.wait_stderr("collector listening on", timeout=30)
            host_agent = VnetProcess(argv=ns_exec + ["agent", "--listen", f"unix:{tmp_path}/hv.sock", "--key",
                                                     str(key_path), "--host", "hv", "--spool",
                                                     str(tmp_path / "spool")])
            procs.append(host_agent)
            host_agent.wait_stderr("agent listening on", timeout=30)
            spec = tmp_path / "spec.toml"
            spec.write_text(f"""
[trace]
name = "boundary"
duration = 6

[collector]
address = "{HOST_IP}:7879"
key = "{key_path}"

[filter]
expression = "udp and dst port {PORT}"

[[host]]
name = "hv"
agent = "unix:{tmp_path}/hv.sock"
interfaces = ["vtap0"]
direction = "egress"

[[host]]
name = "guest"
agent = "{GUEST_IP}:7878"
interfaces = ["{guest_if}"]
direction = "ingress"
probes = ["net:netif_receive_skb"]
""")
            dispatch = VnetProcess(argv=ns_exec + ["dispatch", str(spec), "--json", "-q"])
            procs.append(dispatch)
            dispatch.wait_stderr("guest: tracing", timeout=120)
            marks["both hosts tracing"] = time.monotonic() - t0
            send_udp(hv, GUEST_IP, PORT, count=SENT)
            assert dispatch.wait(timeout=180) == 0, "\n".join(dispatch.stderr)
            marks["dispatch done"] = time.monotonic() - t0
            summary = json.loads(dispatch.stdout[-1])
            assert all(v == 0 for v in summary["losses"].values()), summary["losses"]
        finally:
            _stop_guest(hv)
            for p in reversed(procs):
                p.close()
            try:
                guest.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(guest.pid, 15)
                guest.wait(timeout=30)
            marks["guest gone"] = time.monotonic() - t0
            print("\ntimings (s):", {k: round(v, 1) for k, v in marks.items()})

    def ours(host):
        events = list(TraceFileReader(out / "boundary" / f"{host}.vnt").events())
        return [e for e in events if e.get("proto") == "udp" and e.get("dport") == PORT]

    tap, inside = ours("hv"), ours("guest")
    nic = [e for e in inside if e["probe"].startswith("dev:")]
    tp = [e for e in inside if e["probe"] == "net:netif_receive_skb"]
    assert len(tap) == SENT and len(nic) == SENT and len(tp) == SENT, (len(tap), len(nic), len(tp))
    assert {e["pkt_id"] for e in tap} == {e["pkt_id"] for e in nic} == {e["pkt_id"] for e in tp}
    header = TraceFileReader(out / "boundary" / "guest.vnt").header
    assert header["kernel"].startswith("6.1.") and header["host"] == "guest"
    clocks = list(TraceFileReader(out / "boundary" / "guest.vnt").chunks(["clock"]))
    assert clocks, "the collector measured the guest's clock"
    assert 0 <= clocks[-1]["error_ns"] < 500_000_000, clocks[-1]  # software emulation: generous
