"""vnet.agent.forked: a function's result or error, computed in a forked child."""

import os
import threading

import pytest

from vnet.agent.forked import ChildError, run_forked
from vnet.errors import UsageError, VnetError


def test_result_comes_back_and_child_state_does_not():
    seen = []

    def work():
        seen.append(1)  # in the child's copy of this list
        return {"pid": os.getpid(), "big": b"x" * (1 << 20), "n": [1, 2, 3]}

    out = run_forked(work)
    assert out["pid"] != os.getpid() and out["big"] == b"x" * (1 << 20) and out["n"] == [1, 2, 3]
    assert seen == []


def test_vnet_error_keeps_message_hint_and_exit_code():
    def work():
        raise UsageError("bad probe", hint="try another")

    with pytest.raises(ChildError) as e:
        run_forked(work)
    assert e.value.message == "bad probe" and e.value.hint == "try another" and e.value.exit_code == 2


def test_other_exception_and_a_dead_child_are_vnet_errors():
    with pytest.raises(VnetError, match="ZeroDivisionError"):
        run_forked(lambda: 1 // 0)
    with pytest.raises(VnetError, match="worker process failed"):
        run_forked(lambda: os._exit(3))


def test_held_locks_are_free_in_the_child():
    lock, rlock = threading.Lock(), threading.RLock()

    def work():
        with lock, rlock:  # would hang if the fork had copied them held
            return "ok"

    assert run_forked(work, locks=(lock, rlock), timeout=30) == "ok"
    assert lock.acquire(blocking=False) and rlock.acquire(blocking=False)


def test_works_with_more_than_1024_descriptors_open():
    """An agent holding many probes' programs, maps and links has descriptors past 1023,
    which select() refuses ("filedescriptor out of range")."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY
                                                else min(max(soft, 1200), hard), hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert run_forked(lambda: {"ok": 1}) == {"ok": 1}
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
