"""`vnet demo`: the CLI around the scenarios (vnet/demo/): the bridge scenario end to
end with --json, a bad scenario name, and Ctrl-C in the middle leaving nothing behind."""

import json
import signal
import subprocess
import sys
import time

from kernel_support import VnetProcess


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_bridge_scenario_reports_every_hop_as_json(tmp_path):
    before = _netns()
    out = subprocess.run([sys.executable, "-m", "vnet", "demo", "bridge", "--quick", "--json", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)["results"][0]
    assert r["name"] == "bridge" and r["ok"], r
    assert r["numbers"]["delivered"] == r["numbers"]["sent"] and r["numbers"]["lost"] == 0
    assert len(r["numbers"]["per_hop"]) >= 3 and "slowest hop" in r["verdict"]
    assert (tmp_path / "bridge" / "bridge-events.jsonl").stat().st_size > 0
    assert _netns() == before


def test_unknown_scenario_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vnet", "demo", "nope", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "vnet: error: unknown demo scenario 'nope' (one of ovs-congestion, tail-latency, bridge, all)"]


def test_ctrl_c_mid_scenario_removes_what_it_built(tmp_path):
    before = _netns()
    p = VnetProcess(argv=[sys.executable, "-m", "vnet", "demo", "bridge", "-o", str(tmp_path)])
    try:
        p.wait_stderr("tracing 4 hooks", timeout=60)
        time.sleep(0.3)
        p.proc.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 130, "\n".join(p.stderr)
    finally:
        p.close()
    assert any("interrupted during bridge" in line for line in p.stderr), p.stderr
    assert _netns() == before
    tc = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    assert "vnet" not in tc
