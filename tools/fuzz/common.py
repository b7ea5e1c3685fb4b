"""What the coverage-guided harnesses share: run one under atheris (libFuzzer) with a
seed corpus, and say how a run went.

    python tools/fuzz/NAME.py [libFuzzer options] [CORPUS_DIR ...]

Without a corpus directory the harness seeds a temporary one (its SEEDS). Useful
options: -max_total_time=SECONDS, -runs=N, -max_len=BYTES, -print_final_stats=1.
A crash (an exception the harness does not allow) stops the run and writes the
input to ./crash-*; rerun with that file as the only argument to reproduce it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run(test_one, seeds: list[bytes], default_max_len: int = 4096) -> None:
    import atheris

    args = list(sys.argv)
    if not any(a.startswith("-max_len=") for a in args):
        args.insert(1, f"-max_len={default_max_len}")
    if not any(not a.startswith("-") for a in args[1:]):   # no corpus or input file: seed one
        corpus = Path(tempfile.mkdtemp(prefix="vnet-fuzz-"))
        for i, seed in enumerate(seeds):
            (corpus / f"seed{i}").write_bytes(seed)
        args.append(str(corpus))
    atheris.Setup(args, test_one)
    atheris.Fuzz()


def read_everything(path) -> None:
    """What every reader of a trace file does, as the fuzzers and tests/unit/test_fuzz_tracefile.py
    exercise it: open it, every chunk (plain and mapped), the side-chunk scan, every event
    decoded, the chunks' event counts. Only a UsageError may come out, and only when opening or from a header that
    describes no decodable record layout; a reader that stopped early says why."""
    from vnet.collector.tracefile import TraceFileReader
    from vnet.errors import UsageError

    try:
        r = TraceFileReader(path)
    except UsageError:
        return
    for views in (False, True):
        for c in r.chunks(views=views):
            assert isinstance(c, dict) and isinstance(c["kind"], str), c
        assert r.problem is None or r.truncated
    if r.header is not None:
        for _ in r.scan(("clock",)):
            pass
        for kind, seq, count in r.event_counts():  # what the loss accounting reads
            assert kind in ("events", "dropped") and isinstance(seq, int) and isinstance(count, int)
        try:
            for ev in r.events():
                assert isinstance(ev, dict)
        except UsageError:
            pass  # refused, in words
