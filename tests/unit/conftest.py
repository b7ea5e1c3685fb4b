"""Fixtures the unit tests share."""

from __future__ import annotations

import contextlib
import threading

import pytest

from vnet.collector.server import Collector
from vnet.protocol import MAX_DATA_BYTES
from vnet.protocol.server import Server

KEY = bytes(range(32))  # the key of the tests that talk to `collector` (they define the same)


@contextlib.contextmanager
def serving_collector(tmp_path, **options):
    """A real collector (Collector(**options)) serving on a unix socket in this process:
    (collector, address, out) until the block ends."""
    col = Collector(tmp_path / "out", **options)
    srv = Server(f"unix:{tmp_path}/col.sock", KEY, "collector", col.handle, limit=MAX_DATA_BYTES)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    try:
        yield col, f"unix:{tmp_path}/col.sock", tmp_path / "out"
    finally:
        srv.stop()
        thread.join(timeout=15)  # the peers' handlers finish first (PEERS_STOP_S)
        col.close()


@pytest.fixture
def collector(tmp_path):
    """A real collector serving on a unix socket in this thread's process: (collector, address, out)."""
    with serving_collector(tmp_path) as served:
        yield served


@pytest.fixture
def serve_collector():
    """serving_collector itself, for a test that wants other Collector options (the test
    modules cannot import this conftest by name: tests/kernel has one too)."""
    return serving_collector
