"""A user embeds vnet in a minimal VM image: build one (debootstrap --variant=minbase
+ python3, libbpf1, iproute2, kmod; the vnet wheel and its dependencies installed as
binary wheels, no compiler), boot it under qemu as the guest's root filesystem on
Debian's 6.1 kernel, and run a real `vnet trace` (and `vnet doctor`) inside it.

The image is cached in tools/vm/cache/minimal-image (+ .ext4; VNET_MINIMAL_IMAGE to
move it) and rebuilt only when the wheel's bytes change (hatchling's wheels are
reproducible); the debootstrap base is cached as a tarball next to it. First run:
about 2 minutes (debootstrap about 40 s), then about 1 minute (wheel, boot, trace).

Needs root, tools/vm/setup.sh (qemu, the 6.1 kernel, virtme-ng), network access to
the package index (build isolation, pip download on the host) and, the first time,
to the Debian mirror (debootstrap; minimal_image.sh installs debootstrap if missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools" / "vm"
IMAGE = Path(os.environ.get("VNET_MINIMAL_IMAGE", TOOLS / "cache" / "minimal-image")).resolve()
STEP_TIMEOUT = 600  # build steps (a slow mirror or package index); not a performance assertion
GUEST_TIMEOUT = 600  # boot + run; run_minimal_image.py kills qemu after it
EVENT_KEYS = {"ts_ns", "probe", "ifname", "ifindex", "dir", "len", "proto", "src", "dst", "sport", "dport", "pkt_id"}
COMPILER_NAME = re.compile(r"(.*-)?(cc|gcc|g\+\+|c\+\+|clang|clang\+\+|tcc|c89|c99)(-[\d.]+)?")
COMPILER_PACKAGE = re.compile(r"(gcc|g\+\+|cpp|clang|llvm|tcc|libgcc-\d+-dev|build-essential)(-[\d.]+)?")

pytestmark = pytest.mark.vmimage
timings: dict[str, float] = {}


def run(argv: list[str], step: str, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    timings[step] = round(time.monotonic() - start, 1)
    print(f"\n$ {' '.join(map(str, argv))}  ({timings[step]} s)\n{proc.stdout}{proc.stderr}")
    return proc


def image_info() -> dict[str, str]:
    lines = (IMAGE / ".vnet-image").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)], "build wheel")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("vnet-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def image(wheel) -> Path:
    proc = run(["bash", str(TOOLS / "minimal_image.sh"), str(IMAGE), str(wheel)], "build image")
    assert proc.returncode == 0, f"minimal_image.sh exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert (IMAGE.with_name(IMAGE.name + ".ext4")).is_file()
    assert image_info()["wheel_sha256"] == sha256(wheel)
    return IMAGE


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def guest(image, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    results = tmp_path_factory.mktemp("results")
    disk = image.with_name(image.name + ".ext4")
    before = sha256(disk)
    proc = run([sys.executable, str(TOOLS / "run_minimal_image.py"), "--image", str(image),
                "--results", str(results), "--timeout", str(GUEST_TIMEOUT)], "boot and trace",
               timeout=GUEST_TIMEOUT + 60)
    assert sha256(disk) == before, f"booting modified {disk}"
    return proc, results


def test_image_has_no_compiler(image):
    status = (image / "var/lib/dpkg/status").read_text()
    installed = [m.group(1) for m in re.finditer(r"^Package: (\S+)\n(?:[^\n]+\n)*?Status: install ok installed$",
                                                 status, re.M)]
    assert "python3" in installed and "libbpf1" in installed and "iproute2" in installed
    assert [p for p in installed if COMPILER_PACKAGE.fullmatch(p)] == []
    for d in ("usr/bin", "usr/sbin", "usr/local/bin", "usr/local/sbin", "opt/vnet/bin"):
        offenders = [f for f in os.listdir(image / d) if COMPILER_NAME.fullmatch(f)]
        assert offenders == [], f"compilers in {image / d}: {offenders}"
    assert not list((image / "usr/lib").glob("gcc*")), "a GCC tree in the image"


def test_image_reports_what_vnet_adds(image):
    info = image_info()
    base, added, venv = (int(info[k]) for k in ("base_bytes", "added_bytes", "venv_bytes"))
    print(f"\nbase {base / 2**20:.1f} MiB, vnet + deps add {added / 2**20:.1f} MiB (venv {venv / 2**20:.1f} MiB)")
    assert base > 0 and 0 < venv <= added
    assert (image / "opt/vnet/bin/vnet").is_file() and os.readlink(image / "usr/local/bin/vnet") == "/opt/vnet/bin/vnet"
    site = next((image / "opt/vnet/lib").glob("python3.*/site-packages"))
    for dist in ("vnet", "cffi", "pyroute2", "typer", "msgpack", "scapy"):
        assert list(site.glob(f"{dist}-*.dist-info")), f"{dist} not installed in the image"
    assert not list(site.glob("pip-*.dist-info")), "pip was left in the image"


def guest_packages(results: Path) -> str:
    status = IMAGE / "var/lib/dpkg/status"
    return status.read_text() if status.is_file() else ""


def test_vnet_traces_inside_the_minimal_image(guest):
    proc, results = guest
    summary = json.loads((results / "summary.json").read_text()) if (results / "summary.json").is_file() else {}
    print(f"\ntimings on the host: {timings}\nguest: {summary}")
    assert proc.returncode == 0, (f"run_minimal_image.py exited {proc.returncode}: {summary.get('problems')}\n"
                                  f"{proc.stdout[-6000:]}")
    assert summary["passed"] and summary["root"].endswith(".ext4")
    assert (results / "doctor.rc").read_text().strip() == "0", (results / "doctor.txt").read_text()
    assert "device probes (clsact)" in (results / "doctor.txt").read_text()  # 6.1: no tcx
    assert (results / "compilers.txt").read_text().strip() == ""
    # tcpdump expressions: libpcap is not in the image; without it, one line and exit code 5
    pcap = (results / "pcap.txt").read_text()
    if re.search(r"^Package: libpcap0\.8$", guest_packages(results), re.M):
        assert (results / "pcap.rc").read_text().strip() == "0" and "(000) ldh      [12]" in pcap, pcap
    else:
        assert (results / "pcap.rc").read_text().strip() == "5", pcap
        assert pcap.count("\n") == 1 and "requires libpcap" in pcap, pcap
    assert (results / "trace.rc").read_text().strip() == "0", (results / "trace.err").read_text()
    events = [json.loads(line) for line in (results / "events.jsonl").read_text().splitlines()]
    assert len(events) == 4
    for ev in events:
        assert not EVENT_KEYS - ev.keys(), ev
        assert re.fullmatch(r"[0-9a-f]{16}", ev["pkt_id"]), ev
        assert ev["probe"] in ("dev:vnimg-a/veth-a:egress", "dev:vnimg-a/veth-a:ingress"), ev
        assert ev["ifname"] == "veth-a" and ev["len"] > 0
    sent = [e for e in events if e["dir"] == "egress" and e["proto"] == "udp"]
    assert sent and all(e["dst"] == "10.203.0.2" and e["dport"] == 5555 for e in sent), events
    assert len({e["pkt_id"] for e in events}) == 4  # four different packets
    assert re.search(r"^vnet: 4 events printed", (results / "trace.err").read_text(), re.M)
