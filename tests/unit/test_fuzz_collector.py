"""A hostile *authenticated* agent against a real `vnet collect` process (issue 11): the
key proves who is talking, not that what it sends is sane. Generated sessions over
loopback TCP, one or two connections at once claiming the same trace and host: opens
with headers of every wrong shape, chunks whose envelope and head disagree, heads with
fields of every wrong type (and keys that are not names), records that are garbage or
missing or sent with a kind that takes none, sequence numbers out of order, replayed,
negative or 2**64-1, chunks before any open, pongs of junk, closes twice, messages the
collector does not take.

Each message is served (an ack, a reply) or the connection is refused with a logged
reason (`dropped PEER: why` on the collector's stderr); the collector never crashes
(`handler failed` is a bug), never hangs (every reply within the channel's timeout),
stays under a memory bound, and its files stay readable by the trace reader and by
`vnet analyze`'s read_table. Afterwards an honest agent is served as usual.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_fuzz_tracefile import CHUNKS, HEADER, RECORDS, read_all, records, values  # noqa: E402
from vnet.errors import VnetError  # noqa: E402
from vnet.protocol import MAX_DATA_BYTES, connect, load_key, new_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RSS_BOUND = 256 << 20        # the collector process, after every session (blobs here are at most 2 MiB)
REPLY_TIMEOUT = 20.0         # a hang, not a slow machine
PEER = re.compile(r"127\.0\.0\.1:\d+")
EXAMPLES = int(os.environ.get("VNET_FUZZ_COLLECTOR_EXAMPLES", "1500"))


class Collector:
    """`vnet collect` on loopback, its stderr kept."""

    def __init__(self, tmp: Path):
        self.key_path = new_key(tmp / "key")
        self.key = load_key(self.key_path)
        self.out = tmp / "out"
        self.proc = subprocess.Popen([sys.executable, "-m", "vnet", "collect", "--listen", "127.0.0.1:0", "--key",
                                      str(self.key_path), "--out", str(self.out)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: list[str] = []
        self.ends: dict[str, str] = {}   # peer -> the line that says why its connection ended
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(lambda ln: "listening on" in ln, 30)
        self.address = line.rsplit(" ", 1)[1].strip()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._new:
                self.lines.append(line)
                if "dropped" in line or "went away" in line or "handler failed" in line:
                    m = PEER.search(line)
                    if m:
                        self.ends[m.group(0)] = line
                self._new.notify_all()

    def why_ended(self, peer: str, timeout: float) -> str | None:
        """The line the collector logged when it let `peer` go."""
        deadline = time.monotonic() + timeout
        with self._new:
            while peer not in self.ends and time.monotonic() < deadline and self.proc.poll() is None:
                self._new.wait(max(0.0, deadline - time.monotonic()))
            return self.ends.get(peer)

    def wait_for(self, pred, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        with self._new:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._new.wait(left)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    c = Collector(tmp_path_factory.mktemp("fuzzcollector"))
    c.outcomes = Counter()
    yield c
    c.close()


# -- generated sessions ----------------------------------------------------------------------------

TRACES = ["t0", "t1"]
HOSTS = ["h0", "h1", "h2", "h3"]
EVENTS = [c for c in CHUNKS if c["kind"] == "events"]
names = st.one_of(st.sampled_from(TRACES), st.sampled_from(["../up", "", "a" * 65, "x/y", ".h"]), values)
hosts = st.one_of(st.sampled_from(HOSTS), st.sampled_from(["..", "h h", "\x00"]), values)


@st.composite
def headers(draw):
    h = dict(HEADER)
    how = draw(st.sampled_from(["real", "field", "junk", "reserved"]))
    if how == "field":
        h[draw(st.sampled_from(sorted(h)))] = draw(values)
    elif how == "junk":
        return draw(values)
    elif how == "reserved":  # fields the writer sets itself
        h.update(draw(st.dictionaries(st.sampled_from(["kind", "seq", "format", "part"]), values, min_size=1)))
    return h


ints = st.integers(-(1 << 63), (1 << 64) - 1)   # what msgpack can carry
seqs = st.one_of(st.integers(-3, 30), st.sampled_from([-(1 << 63), (1 << 63) - 1, (1 << 64) - 1]), values)

extra_keys = st.one_of(st.text(max_size=8), st.sampled_from(["self", "kind", "seq", "records", "count", "fields",
                                                             "first", "last", "format", "part"]), st.binary(max_size=4))


MUTATIONS = ["none"] * 8 + ["envelope seq", "head seq", "kind", "count", "keys", "not a map",
             "garbage records", "no records", "records beside another kind"]


@st.composite
def chunks(draw):
    """A chunk message: envelope seq, head, blob; a coherent one (events with real records,
    stats, end) or one with one thing wrong."""
    seq = draw(st.integers(-3, 40))
    kind = draw(st.sampled_from(["events", "events", "events", "stats", "end"]))
    head = {"kind": kind, "seq": seq}
    blob = None
    if kind == "events":
        i = draw(st.integers(0, len(EVENTS) - 1))
        head["count"], blob = EVENTS[i]["count"], EVENTS[i]["records"]
    else:
        head.update(draw(st.dictionaries(st.text(max_size=8), values, max_size=3)))
    how = draw(st.sampled_from(MUTATIONS))
    if how == "envelope seq":
        seq = draw(seqs)
    elif how == "head seq":
        head["seq"] = draw(seqs)
    elif how == "kind":
        head["kind"] = draw(st.one_of(st.sampled_from(["header", "gap", "clock", "nonsense", ""]), values))
    elif how == "count":
        head["count"] = draw(st.one_of(st.sampled_from([-1, (1 << 64) - 1, 1 << 40]), values))
    elif how == "keys":
        head.update(draw(st.dictionaries(extra_keys, values, min_size=1, max_size=3)))
    elif how == "not a map":
        head = draw(values)
    elif how == "garbage records" and kind == "events":
        blob = draw(st.one_of(records(), st.binary(min_size=1, max_size=256),
                              st.sampled_from([b"\x00" * (2 << 20), b"\xff" * 4096])))
    elif how == "no records":
        blob = None
    elif how == "records beside another kind" and kind != "events":
        blob = draw(st.sampled_from(RECORDS))
    return {"type": "chunk", "seq": seq, "chunk": head}, blob


def opens():
    return st.fixed_dictionaries({"type": st.just("open"), "trace": names, "host": hosts, "header": headers()})


def good_open(trace="t0", host="h0"):
    return {"type": "open", "trace": trace, "host": host, "header": dict(HEADER)}


others = st.one_of(
    opens().map(lambda m: (m, None)),
    st.builds(good_open, st.sampled_from(TRACES), st.sampled_from(HOSTS)).map(lambda m: (m, None)),
    st.fixed_dictionaries({"type": st.just("pong")}, optional={"t": st.one_of(ints, values),
                                                               "mono_ns": st.one_of(ints, values),
                                                               "real_ns": values}).map(lambda m: (m, None)),
    st.just(({"type": "close"}, None)),
    st.fixed_dictionaries({"type": st.sampled_from(["start", "stop", "opened", "ack", "hello", "ping", "nonsense"])},
                          optional={"x": values}).map(lambda m: (m, None)),
)
messages = st.integers(0, 9).flatmap(lambda n: chunks() if n < 7 else others)   # mostly chunks
REPLIES = {"open": ("opened",), "chunk": ("ack",), "close": ("closed",)}


@st.composite
def sessions(draw):
    """Steps (connection 0 or 1, message, blob); most sessions open a real stream first."""
    steps = []
    if draw(st.integers(0, 4)):
        trace, host = draw(st.sampled_from(TRACES)), draw(st.sampled_from(HOSTS))
        steps.append((0, good_open(trace, host), None))
        if draw(st.booleans()):  # a second connection claiming the same trace and host
            steps.append((1, good_open(trace, host), None))
    for conn, (msg, blob) in draw(st.lists(st.tuples(st.integers(0, 1), messages), max_size=8)):
        steps.append((conn, msg, blob))
    return steps


def _reply(ch, want: tuple[str, ...]):
    """The reply to a request, the collector's clock pings answered or skipped on the way."""
    while True:
        m = ch.recv(want + ("ping",))
        if m["type"] != "ping":
            return m


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(steps=sessions())
def test_every_message_is_served_or_refused_with_a_reason(collector, steps):
    chans: dict[int, object] = {}
    dead: set[int] = set()
    refused: list[str] = []   # local ports of connections the collector closed
    try:
        for conn, msg, blob in steps:
            if conn in dead:
                continue
            if conn not in chans:
                chans[conn] = connect(collector.address, collector.key, "collector", limit=MAX_DATA_BYTES,
                                      timeout=REPLY_TIMEOUT)
            ch = chans[conn]
            try:
                try:
                    ch.send(msg, blob)
                except VnetError:  # over this end's own limit: nothing was sent
                    collector.outcomes["unsendable"] += 1
                    continue
                want = REPLIES.get(msg["type"])
                if want:
                    collector.outcomes[_reply(ch, want)["type"]] += 1
                if msg["type"] == "close":
                    ch.close()
                    dead.add(conn)
            except TimeoutError:
                pytest.fail(f"the collector did not answer {msg['type']} within {REPLY_TIMEOUT} s (hung)")
            except (VnetError, OSError):
                # refused: the collector closed the connection; it must say why
                refused.append(f"127.0.0.1:{ch.sock.getsockname()[1]}" if not ch.closed else "?")
                collector.outcomes["refused"] += 1
                dead.add(conn)
    finally:
        for ch in chans.values():
            ch.close()
    for peer in refused:
        if peer != "?":
            line = collector.why_ended(peer, 10)
            assert line is not None, f"{peer}: refused without a logged reason"
            assert "handler failed" not in line, "".join(collector.lines[-40:])
    assert collector.proc.poll() is None, "".join(collector.lines[-40:])
    assert collector.rss() < RSS_BOUND


def test_afterwards_no_crash_files_readable_and_an_honest_agent_is_served(collector, tmp_path):
    outcomes = collector.outcomes
    print("outcomes:", dict(outcomes))
    # the sessions reached both ends: chunks written, opens served, refusals
    assert outcomes["ack"] >= 200 and outcomes["opened"] >= 200 and outcomes["refused"] >= 200, outcomes
    bugs = [ln for ln in collector.lines if "handler failed" in ln or "Traceback" in ln]
    assert not bugs, "".join(collector.lines)
    # an honest agent: its chunks written and acknowledged in order, its file whole
    ch = connect(collector.address, collector.key, "collector", limit=MAX_DATA_BYTES, timeout=REPLY_TIMEOUT)
    ch.send(good_open("honest", "h0"))
    assert _reply(ch, ("opened",))["have"] == -1
    for seq, c in enumerate(EVENTS):
        ch.send({"type": "chunk", "seq": seq, "chunk": {"kind": "events", "seq": seq, "count": c["count"]}},
                c["records"])
        assert _reply(ch, ("ack",))["seq"] == seq
    ch.send({"type": "close"})
    closed = _reply(ch, ("closed",))
    ch.close()
    assert closed["gaps"] == [] and closed["chunks"] == len(EVENTS)
    # every file the sessions left: the reader steps over or reports what it cannot read
    files = sorted(collector.out.rglob("*.vnt*"))
    assert files
    for path in files:
        read_all(path)
    pytest.importorskip("numpy")
    from vnet.analysis.stream import read_table
    from vnet.errors import UsageError

    for trace in ["honest", *TRACES]:
        folder = collector.out / trace
        if folder.exists():
            try:
                read_table([folder], parallel=False)
            except UsageError as e:   # refused in words: a header no record layout can be read from
                assert trace != "honest", e
    honest = read_table([collector.out / "honest"], parallel=False)
    assert honest.events > 0
