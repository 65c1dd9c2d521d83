"""The forked-child sandbox the engine decodes pictures and renders chat templates in
(``edgephi.runtime.sandbox``)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from edgephi.runtime import sandbox

pytestmark = pytest.mark.skipif(not sandbox.available(), reason="needs fork()")


def test_the_childs_arrays_come_back() -> None:
    arrays = {"a": np.arange(6).reshape(2, 3), "b": np.ones(3, np.float16)}
    got = sandbox.unpack_arrays(sandbox.run_forked(lambda: sandbox.pack_arrays(arrays), 30))
    assert got["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and got["b"].dtype == np.float16


def test_a_child_that_calls_c_exit_is_a_fatal_error_and_the_parent_lives() -> None:
    def work() -> bytes:
        ctypes.CDLL(None).exit(1)  # what libjpeg's fatal error handler does
        raise AssertionError("exit() returned")

    with pytest.raises(sandbox.ChildDied, match="a fatal error in native code"):
        sandbox.run_forked(work, 30)


def test_a_childs_exception_comes_back_as_its_message() -> None:
    def work() -> bytes:
        raise ValueError("no such format")

    with pytest.raises(sandbox.ChildFailed, match=r"^no such format$"):
        sandbox.run_forked(work, 30)


def test_a_child_that_hangs_once_is_made_again(tmp_path: Path) -> None:
    # The first child marks the file and hangs, as a child that inherited a held lock would;
    # the second finds the mark and answers.
    mark = tmp_path / "hung"

    def work() -> bytes:
        if not mark.exists():
            mark.touch()
            time.sleep(3600)
        return b"ok"

    start = time.monotonic()
    assert sandbox.run_forked(work, 2) == b"ok"
    assert mark.exists() and 2 <= time.monotonic() - start < 30


def test_a_child_that_always_hangs_is_killed_and_refused() -> None:
    start = time.monotonic()
    with pytest.raises(sandbox.ChildDied, match="no result within 1 s, 2 times"):
        sandbox.run_forked(lambda: time.sleep(3600) or b"", 1)
    assert time.monotonic() - start < 20


def test_a_child_past_its_memory_allowance_fails_and_the_parent_keeps_its_own() -> None:
    def grab() -> bytes:
        return bytes(512 << 20)  # half a gigabyte, against an allowance of 64 MiB

    with pytest.raises(sandbox.ChildFailed, match="ran out of its memory allowance"):
        sandbox.run_forked(grab, 30, memory=64 << 20)
    # Within the allowance the child allocates; the allowance was the child's, not the parent's.
    assert sandbox.run_forked(lambda: bytes(32 << 20)[:2], 30, memory=256 << 20) == b"\0\0"
    assert len(grab()) == 512 << 20


def test_an_interrupted_parent_takes_its_child_with_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    def work() -> bytes:
        pid_file.write_text(str(os.getpid()))
        time.sleep(3600)
        return b""

    main = threading.get_ident()
    timer = threading.Timer(1.0, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        sandbox.run_forked(work, 60)
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # reaped: no such process


def test_a_deadline_grows_with_the_picture() -> None:
    assert 120 <= sandbox.deadline_for(64 * 48) < 121
    assert 350 < sandbox.deadline_for(64 * 2**20) < 450  # the largest picture a device decodes


def test_a_worker_serves_many_jobs_and_a_jobs_exception_does_not_end_it() -> None:
    def serve(job: bytes) -> bytes:
        if job == b"bad":
            raise ValueError("not this one")
        return job.upper() * 2

    worker = sandbox.Worker(serve)
    try:
        assert [worker.run(j, 10) for j in (b"a", b"", b"x" * (3 << 20))] == [b"AA", b"", b"X" * (6 << 20)]
        with pytest.raises(sandbox.ChildFailed, match=r"^not this one$"):
            worker.run(b"bad", 10)
        assert worker.alive and worker.run(b"b", 10) == b"BB"
    finally:
        worker.close()
    assert not worker.alive


@pytest.mark.parametrize("how", ["crash", "hang"])
def test_a_job_that_crashes_or_hangs_its_worker_ends_it(how: str) -> None:
    def serve(job: bytes) -> bytes:
        if job == b"crash":
            ctypes.string_at(0)  # SIGSEGV, as a template's endless recursion gives
        if job == b"hang":
            time.sleep(3600)
        return b"ok"

    worker = sandbox.Worker(serve)
    assert worker.run(b"first", 10) == b"ok"
    start = time.monotonic()
    with pytest.raises(sandbox.ChildDied, match=r"signal 11" if how == "crash" else r"no result within 1 s"):
        worker.run(how.encode(), 1)
    assert time.monotonic() - start < 10 and not worker.alive
    with pytest.raises(sandbox.ChildDied, match="has ended"):
        worker.run(b"again", 10)


def test_a_worker_does_not_hold_the_parents_locks(tmp_path: Path) -> None:
    # Forked while the parent holds a lock (the update lock, during a health check), the
    # worker must not keep it locked after the parent lets go.
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    worker = sandbox.Worker(lambda job: job)
    try:
        assert worker.run(b"ready", 10) == b"ready"  # the worker is up and set
        os.close(fd)  # the parent lets go
        other = os.open(lock, os.O_RDWR)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the worker held it
        os.close(other)
        assert worker.run(b"still here", 10) == b"still here"
    finally:
        worker.close()
