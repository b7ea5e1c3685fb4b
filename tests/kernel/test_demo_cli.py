"""`vnet demo`: the CLI around the scenarios (vnet/demo/): the bridge scenario end to
end with --json, a bad scenario name, and Ctrl-C in the middle leaving nothing behind."""

import json
import signal
import subprocess
import sys

from kernel_support import VnetProcess


def _netns(prefix: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {n for n in (line.split()[0] for line in out.splitlines() if line.strip()) if n.startswith(prefix)}


def test_bridge_scenario_reports_every_hop_as_json(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vnet", "demo", "bridge", "--quick", "--json", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)["results"][0]
    assert r["name"] == "bridge" and r["ok"], r
    assert r["numbers"]["delivered"] == r["numbers"]["sent"] and r["numbers"]["lost"] == 0
    assert len(r["numbers"]["per_hop"]) >= 3 and "slowest hop" in r["verdict"]
    assert (tmp_path / "bridge" / "bridge-events.jsonl").stat().st_size > 0
    assert r["numbers"]["netns"].endswith("*") and not _netns(r["numbers"]["netns"].rstrip("*"))


def test_unknown_scenario_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vnet", "demo", "nope", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "vnet: error: unknown demo scenario 'nope' (one of ovs-congestion, tail-latency, tail-latency-qemu, vm-boundary, bridge, all)"]


def test_ctrl_c_mid_scenario_removes_what_it_built(tmp_path):
    for attempt in range(3):  # Ctrl-C once the topology is built; a loaded machine may be late
        p = VnetProcess(argv=[sys.executable, "-m", "vnet", "demo", "bridge", "-o", str(tmp_path / str(attempt))])
        try:
            line = p.wait_stderr("built two namespace VMs", timeout=60)
            p.proc.send_signal(signal.SIGINT)
            rc = p.wait(timeout=60)
        finally:
            p.close()
        if rc != 0:  # 0: the scenario was over before the signal came
            break
    assert rc == 130, "\n".join(p.stderr)
    assert any("interrupted during bridge" in line for line in p.stderr), p.stderr
    prefix = line.rsplit("(", 1)[1].split("*")[0]
    assert prefix and not _netns(prefix)
