"""The scheduler probe's watch set as the bitmap sched.bpf.c reads (vnet_sched_watch:
bit tgid % 64 of word tgid / 64): pure logic, no kernel. That the probe then sees
exactly the watched processes is tests/kernel/test_probes.py's sched test."""

from __future__ import annotations

import pytest

from vnet.binding import BpfObject
from vnet.errors import UsageError
from vnet.objects import object_path
from vnet.probes.catalog import PID_LIMIT
from vnet.probes.resolve import watch_words

WORDS = PID_LIMIT // 64  # the map's max_entries


def test_the_committed_object_has_a_bit_for_every_pid_below_the_limit():
    # Opening an object is ELF work in libbpf: no kernel, no root.
    with BpfObject(object_path("sched")) as obj:
        watch = obj.maps["vnet_sched_watch"]
        assert (watch.max_entries, watch.key_size, watch.value_size) == (WORDS, 4, 8)


def watched(words: dict[int, int], tgid: int) -> bool:
    """What vnet_watched() in sched.bpf.c answers for `tgid`."""
    return bool(words.get(tgid // 64, 0) >> (tgid % 64) & 1)


def test_each_pid_is_one_bit_and_pids_sharing_a_word_share_it():
    pids = (1, 63, 64, 127, 128, 4242, PID_LIMIT - 1)
    words = watch_words(pids, WORDS)
    assert words == {0: 1 << 1 | 1 << 63, 1: 1 | 1 << 63, 2: 1, 66: 1 << 18, WORDS - 1: 1 << 63}
    assert all(0 <= bits < 1 << 64 for bits in words.values())  # each fits the map's u64 value
    for tgid in range(0, 300):
        assert watched(words, tgid) == (tgid in pids)
    assert watched(words, 4242) and not watched(words, 4241) and not watched(words, 4243)


def test_no_pids_watch_nothing_and_repeats_are_harmless():
    assert watch_words((), WORDS) == {}
    assert watch_words((5, 5), WORDS) == {0: 1 << 5}


@pytest.mark.parametrize("pid", [0, -1, PID_LIMIT, 1 << 40])
def test_a_pid_the_map_cannot_hold_is_the_users_error(pid):
    with pytest.raises(UsageError, match=f"--pid {pid}: not a process id"):
        watch_words((pid,), WORDS)
