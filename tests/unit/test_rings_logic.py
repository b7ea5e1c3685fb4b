"""The event rings' pure logic, no kernel: how many rings a trace has, how a chunk
names the ring its records came from (the agent's crash recovery), which pins a record
names, the spec's `rings`, and how large each CPU's event area is."""

from __future__ import annotations

import pytest

from vnet.agent.counters import ring_pins
from vnet.agent.shipper import RING_POSITION_BITS, ring_mark, ring_unmark
from vnet.errors import UsageError
from vnet.binding.cpuarea import online_cpus
from vnet.trace.session import DEFAULT_RINGS, MAX_RINGS, area_chunks, ring_count

ONLINE = "/sys/devices/system/cpu/online"

@pytest.mark.parametrize("cpus, want", [(1, 1), (2, 2), (3, 3), (4, DEFAULT_RINGS), (64, DEFAULT_RINGS)])
def test_by_default_one_ring_per_cpu_up_to_a_few(cpus, want):
    assert ring_count(cpus=cpus) == want


@pytest.mark.parametrize("rings", [1, 2, 3, 64])
def test_rings_as_asked(rings):
    assert ring_count(rings, cpus=2) == rings  # more than CPUs is allowed: some stay empty


@pytest.mark.parametrize("rings", [0, -1, MAX_RINGS + 1])
def test_bad_ring_counts_say_why(rings):
    with pytest.raises(UsageError, match=f"rings: 1 to {MAX_RINGS}, got {rings}"):
        ring_count(rings)


def test_a_ring_mark_keeps_the_ring_and_the_position_and_ring_0s_is_the_plain_position():
    assert ring_mark(0, 123456) == 123456  # what chunks queued before there were rings say
    for ring in (0, 1, MAX_RINGS - 1):
        for position in (0, 8, (1 << RING_POSITION_BITS) - 8):
            assert ring_unmark(ring_mark(ring, position)) == (ring, position)
    assert ring_mark(MAX_RINGS - 1, (1 << RING_POSITION_BITS) - 1) < 1 << 63  # the queue file's i64


def test_ring_pins_in_ring_order_or_an_older_vnets_one_ring():
    assert ring_pins({"ring": "/p/ring-a", "rings": ["/p/ring-a", "/p/ring-a_1"]}) == ["/p/ring-a", "/p/ring-a_1"]
    assert ring_pins({"path": "/p/stats-a", "ring": "/p/ring-a"}) == ["/p/ring-a"]
    assert ring_pins({"path": "/p/stats-a"}) == []
    assert ring_pins(None) == []
    assert ring_pins({"ring": 5, "rings": [1, 2]}) == []  # a damaged record names nothing


def test_export_reorders_over_a_window_per_ring_its_files_were_written_from():
    """A fake host's files (pure logic): the widest ring count of any file, 1 for files from before
    rings were named, a damaged value ignored."""
    from types import SimpleNamespace

    from vnet.analysis.export import HostFiles, _rings

    def host(*headers):
        return HostFiles("h", files=[SimpleNamespace(header=h) for h in headers])

    assert _rings(host({"rings": 2}, {"rings": 4})) == 4
    assert _rings(host({}, None)) == 1
    assert _rings(host({"rings": "4"}, {"rings": 10 ** 9}, {"rings": True})) == 1


MIB = 1 << 20


@pytest.mark.parametrize("ring_bytes, rings, cpus, want", [
    (8 * MIB, 2, 2, 8),      # this machine: each CPU's area as large as its ring
    (8 * MIB, 4, 4, 8),
    (8 * MIB, 4, 64, 0),     # 512 KiB a CPU: less than a chunk, the rings alone
    (8 * MIB, 4, 16, 2),     # 2 MiB a CPU
    (8 * MIB, 4, 24, 1),     # 1.33 MiB: a power of two below it
    (MIB, 1, 2, 0),
    (64 * MIB, 3, 2, 64),    # 96 MiB a CPU: 64
])
def test_the_event_areas_share_out_the_rings_bytes_in_whole_chunks(ring_bytes, rings, cpus, want):
    assert area_chunks(ring_bytes, rings, cpus, MIB) == want


@pytest.mark.parametrize("text, want", [("0-1\n", [0, 1]), ("0\n", [0]), ("0-3,6,8-9\n", [0, 1, 2, 3, 6, 8, 9])])
def test_online_cpus_read_the_kernels_list(text, want, tmp_path, monkeypatch):
    """(A fake /sys file: pure parsing.)"""
    import builtins

    path = tmp_path / "online"
    path.write_text(text)
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(path if p == ONLINE else p, *a, **k))
    assert online_cpus() == want
