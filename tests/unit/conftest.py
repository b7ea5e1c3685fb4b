"""Fixtures the unit tests share."""

from __future__ import annotations

import threading

import pytest

from vnet.collector.server import Collector
from vnet.protocol import MAX_DATA_BYTES
from vnet.protocol.server import Server

KEY = bytes(range(32))  # the key of the tests that talk to `collector` (they define the same)


@pytest.fixture
def collector(tmp_path):
    """A real collector serving on a unix socket in this thread's process: (collector, address, out)."""
    col = Collector(tmp_path / "out")
    srv = Server(f"unix:{tmp_path}/col.sock", KEY, "collector", col.handle, limit=MAX_DATA_BYTES)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    yield col, f"unix:{tmp_path}/col.sock", tmp_path / "out"
    srv.stop()
    thread.join(timeout=5)
    col.close()
