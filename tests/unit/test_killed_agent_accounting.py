"""A killed agent's losses, counted exactly (docs/reliability.md, "Agent SIGKILLed"): the
kernel's counters at its death (the `interrupted` chunk) against the events of its run in
the collector's files. The arithmetic, the files read for it (every segment, each chunk
once, without reading the records), what `vnet analyze` says, and what the collector
keeps of an agent's message. No kernel here: tests/kernel/test_faults.py kills a real agent."""

from __future__ import annotations

import time

import msgpack

from vnet.collector.server import _kernel_counters
from vnet.collector.tracefile import (TraceFileReader, TraceFileWriter, describe_killed_agent_losses,
                                      killed_agent_losses, run_event_counts, stream_accounting)

KEY = bytes(range(32))
AT_DEATH = {"seen": 1500, "emitted": 1000, "lost": 40, "filtered": 460, "frozen": True}


def _file(path, run: str | None, *chunks: tuple) -> TraceFileReader:
    with TraceFileWriter(path, {"host": "h", **({"run": run} if run else {})}) as w:
        for kind, fields in chunks:
            w.write(kind, **fields)
    return TraceFileReader(path)


def test_what_died_with_the_agent_is_what_the_kernel_emitted_and_the_files_lack():
    loss = killed_agent_losses(AT_DEATH, written=700, spool_dropped=50)
    assert loss == {"died_with_agent": 250, "kernel_ring_full": 40, "agent_spool_full": 50}
    # every packet the filter kept is in the files or lost at one stage
    assert 700 + sum(loss.values()) == AT_DEATH["seen"] - AT_DEATH["filtered"]
    assert killed_agent_losses(AT_DEATH, written=1000) == {"died_with_agent": 0, "kernel_ring_full": 40,
                                                           "agent_spool_full": 0}


def test_the_line_says_how_many_died_and_when_it_is_only_a_bound():
    assert describe_killed_agent_losses(AT_DEATH, 700) == (
        "died with the killed agent: 300 events (read from the ring or queued in its memory); kernel_ring_full 40 "
        "(the kernel emitted 1000, the files hold 700)")
    assert "agent_spool_full 50" in describe_killed_agent_losses(AT_DEATH, 700, 50)
    assert "upper bound" in describe_killed_agent_losses({**AT_DEATH, "frozen": False}, 700)
    assert "more than the kernel emitted" in describe_killed_agent_losses(AT_DEATH, 1200)


def test_the_events_of_a_run_are_counted_across_segments_once_each_without_the_records(tmp_path):
    seg0 = _file(tmp_path / "h.vnt", "r1", ("events", {"seq": 0, "count": 300, "records": b"x" * 5000}),
                 ("events", {"seq": 1, "count": 200, "records": b"y" * 5000}))
    # the collector restarted: a new segment; chunk 1 again (a copy given twice counts once),
    # a gap (the dead agent's memory), a dropped marker (its spool was full), a chunk whose
    # count comes after its records (read whole), and an events chunk of 0
    seg1 = _file(tmp_path / "h.vnt.s1", "r1", ("events", {"seq": 1, "count": 200, "records": b"y" * 5000}),
                 ("gap", {"first": 2, "last": 4}), ("dropped", {"seq": 5, "events": 50}),
                 ("events", {"seq": 6, "records": b"z" * 100, "count": 25}),
                 ("events", {"seq": 7, "count": 0, "records": b""}))
    assert sorted(seg1.event_counts()) == [("dropped", 5, 50), ("events", 1, 200), ("events", 6, 25),
                                           ("events", 7, 0)]
    assert run_event_counts([seg0, seg1]) == (525, 50)


def test_analyze_reports_the_killed_agents_losses_for_its_run(tmp_path):
    seg0 = _file(tmp_path / "h.vnt", "r1", ("events", {"seq": 0, "count": 600, "records": b"x" * 64}))
    seg1 = _file(tmp_path / "h.vnt.s1", "r1", ("events", {"seq": 1, "count": 100, "records": b"x" * 64}),
                 ("interrupted", {"reason": "killed", "after": 1, "kernel": AT_DEATH}))
    other = _file(tmp_path / "h.vnt.s2", "r2", ("events", {"seq": 0, "count": 9, "records": b"x" * 64}),
                  ("end", {"seq": 1, "losses": {"kernel_ring_full": 0}}))
    found = stream_accounting([seg0, seg1, other])
    assert found == ["run r1: the agent died mid-trace after chunk 1: killed",
                     "run r1: died with the killed agent: 300 events (read from the ring or queued in its memory); "
                     "kernel_ring_full 40 (the kernel emitted 1000, the files hold 700)"], found


def test_unknown_counters_are_said_and_old_files_read_as_before(tmp_path):
    unknown = _file(tmp_path / "a.vnt", "r1", ("interrupted", {"reason": "killed", "after": -1,
                                                               "kernel_unknown": "no bpffs"}))
    old = _file(tmp_path / "b.vnt", "r2", ("interrupted", {"reason": "killed", "after": -1}))
    assert stream_accounting([unknown, old]) == [
        "run r1: the agent died mid-trace after chunk -1: killed",
        "run r1: what died with the killed agent cannot be counted: no bpffs",
        "run r2: the agent died mid-trace after chunk -1: killed"]


def test_the_collector_keeps_only_well_formed_counters():
    assert _kernel_counters(AT_DEATH) == AT_DEATH
    assert _kernel_counters({**AT_DEATH, "frozen": False})["frozen"] is False
    assert _kernel_counters({k: v for k, v in AT_DEATH.items() if k != "frozen"})["frozen"] is True
    for bad in (None, [], {**AT_DEATH, "lost": -1}, {**AT_DEATH, "emitted": True}, {**AT_DEATH, "seen": "1"},
                {"emitted": 1}):
        assert _kernel_counters(bad) is None, bad


def test_a_restarted_agent_without_the_pin_records_why_the_counters_are_unknown(tmp_path, collector):
    from vnet.agent.shipper import Shipper

    _, address, out = collector
    run_dir = tmp_path / "spool" / "t" / "h" / "r1"
    pinned = {"path": str(tmp_path / "gone"), "probes": 1, "value_size": 32,
              "index": {"seen": 0, "emitted": 1, "lost": 2, "filtered": 3}, "hooks": ["tcx"]}
    dead = Shipper(address, KEY, {"trace": "t", "host": "h", "run": "r1", "header": {}}, spool_dir=run_dir,
                   memory_bytes=0, pinned=pinned)
    dead.put("events", count=1, records=b"a" * 50)
    dead._stop.set()  # as if killed: no close(), the spool stays as it is
    dead._thread.join(timeout=5)
    assert msgpack.unpackb((run_dir / "open").read_bytes(), raw=False)["pinned"] == pinned

    again = Shipper.recover(run_dir, KEY)
    assert again.pinned == pinned and again.kernel_at_death is None
    deadline = time.monotonic() + 20
    while not again.done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert again.done
    again.close()
    r = TraceFileReader(out / "t" / "h.vnt")
    (chunk,) = [c for c in r.chunks() if c["kind"] == "interrupted"]
    assert "kernel" not in chunk and f"pinned at {tmp_path / 'gone'} cannot be read" in chunk["kernel_unknown"]


def test_pin_names_are_what_bpffs_takes_and_a_missing_bpffs_is_said(tmp_path):
    from vnet.agent.counters import leftovers, pin_name
    from vnet.probes.features import bpffs_problem

    assert pin_name("ovs.congestion", "h1.lab", "20261126T152724-ab12cd34") == \
        "stats-ovs_congestion-h1_lab-20261126T152724-ab12cd34"  # bpffs refuses '.' in names
    assert "is not on a bpffs" in bpffs_problem(tmp_path)
    (tmp_path / "stats-a-h-r1").touch()
    (tmp_path / "stats-b-h-r2").touch()
    (tmp_path / "other").touch()
    assert leftovers(tmp_path, {str(tmp_path / "stats-a-h-r1")}) == [str(tmp_path / "stats-b-h-r2")]
    assert leftovers(tmp_path / "absent", set()) == []


def test_a_memory_queue_file_no_spooled_stream_accounts_for_is_named_at_the_agents_start(tmp_path, caplog):
    """A killed agent's queue file (tmpfs) whose spool folder was removed by hand holds memory that
    no agent will read out: the next agent's start names it and how much it holds, as it names
    stray pins, and leaves it as it is."""
    import logging

    import vnet.agent.agent as agent_mod
    from vnet.agent.shipper import QUEUE_FILE, leftover_queues

    queues = tmp_path / "q"
    stray = queues / "t" / "h" / "r1" / QUEUE_FILE
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x" * (1 << 20))
    other = queues / "t" / "h" / "r2" / QUEUE_FILE
    other.parent.mkdir(parents=True)
    other.touch()
    assert leftover_queues(queues, {str(other.parent)}) == [(str(stray), stray.stat().st_blocks * 512)]
    assert leftover_queues(tmp_path / "absent", set()) == []

    with caplog.at_level(logging.WARNING, logger="vnet.agent"):
        agent = agent_mod.Agent(bytes(range(32)), tmp_path / "spool", "h", pin_dir=tmp_path / "pins",
                                queue_dir=queues)
    said = [r.getMessage() for r in caplog.records if "memory queue" in r.getMessage()]
    assert len(said) == 2 and f"memory queue {stray} (1.0 MiB of memory) belongs to no stream" in said[0]
    assert f"rm -r {stray.parent} frees it" in said[0]
    assert stray.exists() and other.exists()  # named, not removed
    assert agent.background == []
