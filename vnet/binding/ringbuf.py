"""Consume a BPF ring buffer map through libbpf's ring_buffer API."""

from __future__ import annotations

import errno
import weakref

from vnet.errors import bpf_error

from .libbpf import ffi, lib
from .object import Map


class _Reader:
    """The libbpf ring_buffer the owning BpfObject frees. Only the pointer: were
    the RingBuffer itself owned, the object's finalizer would keep the object
    alive (RingBuffer -> Map -> BpfObject) and an unclosed object never be freed."""

    def __init__(self, ptr):
        self.ptr = ptr

    def close(self) -> None:
        if self.ptr is not None:
            lib().ring_buffer__free(self.ptr)
            self.ptr = None


class RingBuffer:
    """Records from one ring-buffer map (or several, read one after the other),
    returned in batches as bytes.

    Programs may skip waking the reader (BPF_RB_NO_WAKEUP), so poll() always
    drains after its wait: no record waits longer than one timeout.
    """

    def __init__(self, ring_map: Map, *more: Map):
        self.map = ring_map
        self._batch: list[bytes] = []
        self._error: BaseException | None = None
        self._cb = ffi.callback("int(void *, void *, size_t)", self._on_record, error=-1)
        ptr = lib().ring_buffer__new(ring_map.fd, self._cb, ffi.NULL, ffi.NULL)
        if ptr == ffi.NULL:
            raise bpf_error("create ring buffer reader for", ffi.errno, f"map {ring_map.name}")
        self._reader = ring_map._obj._own(_Reader(ptr))
        for m in more:
            err = lib().ring_buffer__add(ptr, m.fd, self._cb, ffi.NULL)
            if err:
                self._reader.close()
                raise bpf_error("add to ring buffer reader", err, f"map {m.name}")
        # Dropped before its object is closed: free it then, with the callback it calls.
        weakref.finalize(self, self._reader.close)

    @property
    def _ptr(self):
        return self._reader.ptr

    def _on_record(self, _ctx, data, size):
        try:
            self._batch.append(ffi.buffer(data, size)[:])
            return 0
        except BaseException as e:  # surfaced by poll(); libbpf stops on non-zero
            self._error = e
            return -1

    def _take(self) -> list[bytes]:
        batch, self._batch = self._batch, []
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return batch

    def poll(self, timeout_ms: int = 100) -> list[bytes]:
        """Wait up to timeout_ms for a wakeup, then drain what is there."""
        n = lib().ring_buffer__poll(self._ptr, timeout_ms)
        if n < 0 and n != -errno.EINTR and self._error is None:
            raise bpf_error("poll ring buffer", n, f"map {self.map.name}")
        return self.drain()

    def drain(self) -> list[bytes]:
        n = lib().ring_buffer__consume(self._ptr)
        if n < 0 and n != -errno.EINTR and self._error is None:
            raise bpf_error("consume ring buffer", n, f"map {self.map.name}")
        return self._take()

    @property
    def epoll_fd(self) -> int:
        return lib().ring_buffer__epoll_fd(self._ptr)

    def close(self) -> None:
        self._reader.close()
