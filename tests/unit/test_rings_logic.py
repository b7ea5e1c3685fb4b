"""The event rings' pure logic, no kernel: how many rings share the ring bytes, how a chunk
names the ring its records came from (the agent's crash recovery), which pins a record
names, and the spec's `rings`."""

from __future__ import annotations

import pytest

from vnet.agent.counters import ring_pins
from vnet.agent.shipper import RING_POSITION_BITS, ring_mark, ring_unmark
from vnet.dispatch import loads
from vnet.errors import UsageError
from vnet.trace.session import MAX_RINGS, MIN_RING_BYTES, ring_count

MiB = 1 << 20


@pytest.mark.parametrize("ring_bytes, cpus, want", [
    (8 * MiB, 2, 2),      # this machine: two rings of 4 MiB
    (8 * MiB, 1, 1),
    (8 * MiB, 3, 2),      # a power of two: each ring a power of two in size
    (8 * MiB, 64, 8),     # no ring under MIN_RING_BYTES: CPUs share (CPU i writes to ring i mod 8)
    (1 * MiB, 4, 1),
    (4096, 4, 1),         # the smallest ring: one
    (1 << 30, 256, MAX_RINGS),
])
def test_by_default_one_ring_per_cpu_each_at_least_a_mebibyte(ring_bytes, cpus, want):
    n = ring_count(ring_bytes, cpus=cpus)
    assert n == want
    assert ring_bytes // n >= min(ring_bytes, MIN_RING_BYTES)


@pytest.mark.parametrize("rings", [1, 2, 4, 64])
def test_rings_as_asked(rings):
    assert ring_count(8 * MiB, rings, cpus=2) == rings  # more than CPUs is allowed: some stay empty


@pytest.mark.parametrize("rings, ring_bytes, message", [
    (3, 8 * MiB, "a power of two from 1 to 64, got 3"),
    (0, 8 * MiB, "a power of two from 1 to 64, got 0"),
    (128, 8 * MiB, "a power of two from 1 to 64, got 128"),
    (4, 8192, "4 rings in 8192 bytes: each would be less than a page"),
])
def test_bad_ring_counts_say_why(rings, ring_bytes, message):
    with pytest.raises(UsageError, match=message):
        ring_count(ring_bytes, rings)


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


SPEC = """\
[trace]
duration = "10s"
{rings}
[collector]
address = "127.0.0.1:7879"

[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
"""


def test_the_specs_rings_reach_every_agent_and_by_default_none_is_said():
    assert loads(SPEC.format(rings="rings = 2")).control_packages()["hv1"]["rings"] == 2
    assert loads(SPEC.format(rings="")).control_packages()["hv1"]["rings"] is None  # the agent's CPUs decide
