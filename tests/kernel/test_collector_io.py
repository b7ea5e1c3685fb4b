"""The collector's writes on a file system without direct I/O (ramfs, mounted here: root):
plain writes through the page cache, the same bytes, and a line in the log saying so."""

import logging
import subprocess

import pytest

from vnet.collector.server import Stream
from vnet.collector.tracefile import TraceFileReader, TraceFileWriter


@pytest.fixture
def ramfs(tmp_path):
    path = tmp_path / "ramfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], check=True, timeout=10)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


def test_without_direct_io_the_writes_go_through_the_page_cache(ramfs, tmp_path, caplog):
    sizes = [0, 4097, 1 << 20, 3]
    files = []
    for d, direct in ((ramfs, True), (tmp_path, False)):
        w = TraceFileWriter(d / "t.vnt", {"host": "h"}, direct=direct)
        assert not w.direct_io
        for i, n in enumerate(sizes):
            w.write("events", seq=i, count=1, records=b"r" * n)
        w.close()
        files.append((d / "t.vnt").read_bytes())
    assert files[0] == files[1]
    assert [c["seq"] for c in TraceFileReader(ramfs / "t.vnt").chunks(["events"])] == [0, 1, 2, 3]

    caplog.set_level(logging.INFO, logger="vnet.collector")
    st = Stream("t", "h2", ramfs, {"host": "h2"}, None)
    st.open()
    st.writer.close()
    assert any("no direct I/O" in r.getMessage() for r in caplog.records)
