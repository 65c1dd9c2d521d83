"""Run native code that may kill the process in a forked child, and take back its result.

Two things the engine hands to onnxruntime-genai come from outside and can take the whole
process down. og's image decoder (libjpeg inside onnxruntime-extensions) answers some
corrupt JPEGs — a marker in the middle of the image data — with libjpeg's default fatal
error handler, ``exit(1)``, not an exception: a server would die of one bad upload. And
og renders a bundle's chat template with no limits: a macro that calls itself overflows
the C stack (SIGSEGV), nested loops run for ever holding the GIL, others allocate
gigabytes. So the engine does both in a ``fork()`` of itself: the child shares the loaded
model copy-on-write, runs og's code, writes the result to a pipe and exits; a child that
dies, passes its deadline or its memory cap instead becomes one clear error, and the
parent — which waits in ``select`` without the GIL — keeps answering meanwhile.

``fork`` is safe here because the child calls only og's processor or tokenizer (work on
the calling thread) before ``os._exit``, whatever other threads of the parent were doing
(glibc makes ``malloc`` whole again in a child). What a child of a
threaded process must not do, it does not: it never runs the garbage collector (a finalizer
of some unrelated onnxruntime object would wait on threads the child does not have), and
the exit hook it needs is made in the parent, so the child neither ``dlopen``s nor builds a
ctypes closure (both take process-wide locks another thread may have held at the fork). A
child that still hangs — a lock inherited from some other library's thread — is killed
after its deadline (for a picture, sized to it) and tried once more before giving up. The
chat templates go to a ``Worker``: one child kept for them, forked when the model loads.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

Arrays = dict[str, Any]  # name -> numpy array
EXITED = 70  # the child called exit() from native code (libjpeg's fatal error handler)


def deadline_for(pixels: int) -> float:
    """Seconds a child may take over ``pixels``: a 67-megapixel photo takes seconds on a
    Raspberry Pi (and an emulated one is ten times slower), so this is ample, and a child
    that hangs is found in two minutes or so rather than five."""
    return 120.0 + 4.0 * pixels / 1e6


class ChildDied(Exception):
    """The forked child ended without a result; ``str()`` says how."""


class ChildFailed(Exception):
    """The forked child raised; ``str()`` is its message."""


def available() -> bool:
    return hasattr(os, "fork")


@functools.cache
def _exit_hook() -> tuple[Any, Any] | None:
    """``(__cxa_atexit, callback)``: registering ``callback`` in a (forked) process makes C
    ``exit()`` end it at once with ``EXITED``, skipping the atexit handlers.

    libjpeg's fatal errors call ``exit(1)``; the handlers that would then run include
    onnxruntime's static destructors, which wait on threads that do not exist in a forked
    child and hang it for ever. Registered last, the callback runs first. Made once, in the
    parent; ``None`` where the C library has no such hook (the deadline still ends a child).
    """
    import ctypes

    try:
        # glibc and bionic export atexit() only as __cxa_atexit(void (*)(void *), void *, void *).
        register = ctypes.CDLL(None).__cxa_atexit
    except (AttributeError, OSError):
        return None
    return register, ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _arg: os._exit(EXITED))


def run_forked(work: Callable[[], bytes], timeout: float, tries: int = 2, memory: int | None = None) -> bytes:
    """``work()`` in a child process; the bytes it returns, or ``ChildFailed``/``ChildDied``.

    A child with no result after ``timeout`` seconds is killed and, ``tries`` times in all,
    made again: a hang inherited from another thread's lock does not recur in a new fork.
    ``memory``: bytes the child may allocate beyond the address space it was born with
    (where the OS enforces ``RLIMIT_AS``: Linux and Android); past it, allocations fail.
    """
    for attempt in range(tries):
        try:
            return _run_child(work, timeout, memory)
        except _Hung:
            if attempt == tries - 1:
                times = "" if tries == 1 else f", {tries} times"
                raise ChildDied(f"no result within {timeout:.0f} s{times}") from None
    raise AssertionError("unreachable")


class _Hung(Exception):
    pass


def _address_space() -> int | None:
    """This process's virtual size in bytes, where /proc tells it (Linux, Android)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _run_child(work: Callable[[], bytes], timeout: float, memory: int | None) -> bytes:
    hook = _exit_hook()
    # Measured in the parent: the child's own address space is the parent's at the fork.
    born = _address_space() if memory is not None else None
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_fd)
            _child_setup(hook, born, memory)
            _write_frame(write_fd, _answer(work))
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        data = _read_frame(read_fd, time.monotonic() + timeout)
    except BaseException:
        # Hung, or the parent was interrupted (Ctrl-C): the child goes with the wait.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if data is None or status != 0:
        raise ChildDied(_ended(status))
    if data[:1] == b"E":
        raise ChildFailed(data[1:].decode("utf-8", "replace"))
    return data[1:]


def _ended(status: int) -> str:
    """How a child with this wait status ended, for ``ChildDied``."""
    if os.WIFSIGNALED(status):
        return f"a crash, signal {os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    return "a fatal error in native code" if code == EXITED else f"exit status {code}"


def _child_setup(hook: tuple[Any, Any] | None, born: int | None, memory: int | None) -> None:
    """What every child does first (see the module docstring)."""
    gc.disable()
    # libjpeg prints its warnings to stderr; the parent reports one line instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    if hook is not None:
        register, callback = hook
        register(callback, None, None)
    if born is not None and memory is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (born + memory, born + memory))


def _answer(work: Callable[[], bytes]) -> bytes:
    try:
        return b"K" + work()
    except MemoryError:
        return b"E" + b"it ran out of its memory allowance"
    except Exception as exc:
        return b"E" + str(exc).encode("utf-8", "replace")[:2000]


class Worker:
    """A forked child kept for many small jobs of one kind — the engine's chat templates —
    so that each costs a round trip on a pipe (a millisecond), not a fork (~20 ms of page
    tables for a model in memory).

    Made right after the model loads, when what it shares with the parent is mostly the
    weights, which neither side writes again: keeping it costs little memory. (A child
    forked later shares the KV cache too, and each page of it the parent then writes is
    copied.) A job that crashes it or passes its deadline ends it for good: ``alive`` turns
    false and the caller runs later jobs in one-shot children (``run_forked``). An
    exception in a job comes back as ``ChildFailed``; the worker carries on.
    """

    def __init__(self, serve: Callable[[bytes], bytes], memory: int | None = None) -> None:
        hook = _exit_hook()
        born = _address_space() if memory is not None else None
        job_read, job_write = os.pipe()
        answer_read, answer_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: serves until the parent closes its end, never returns
            code = 0
            try:
                # Only its pipes: a lock file of the parent's (the update lock, a model's
                # in-use lock) must not stay locked for as long as the worker lives.
                _close_all_but(job_read, answer_write)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent
                _child_setup(hook, born, memory)
                while True:
                    job = _read_frame(job_read, None)
                    if job is None:
                        break
                    _write_frame(answer_write, _answer(functools.partial(serve, job)))
            except BaseException:
                code = 3
            finally:
                os._exit(code)
        os.close(job_read)
        os.close(answer_write)
        self._pid: int | None = pid
        self._jobs, self._answers = job_write, answer_read
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._pid is not None

    def run(self, job: bytes, timeout: float) -> bytes:
        """``serve(job)`` in the worker; ``ChildDied`` (and the worker ends) when it crashes
        or takes longer than ``timeout`` seconds."""
        with self._lock:
            if self._pid is None:
                raise ChildDied("the worker has ended")
            try:
                _write_frame(self._jobs, job)
                answer = _read_frame(self._answers, time.monotonic() + timeout)
            except _Hung:
                self._end()
                raise ChildDied(f"no result within {timeout:.0f} s") from None
            except OSError:  # the pipe broke: the worker is gone
                raise ChildDied(self._end()) from None
            except BaseException:
                self._end()
                raise
            if answer is None:
                status = self._end()
                raise ChildDied(status)
        if answer[:1] == b"E":
            raise ChildFailed(answer[1:].decode("utf-8", "replace"))
        return answer[1:]

    def close(self) -> None:
        with self._lock:
            if self._pid is not None:
                self._end()

    def _end(self) -> str:
        """Kill and reap the child; how it had ended."""
        pid, self._pid = self._pid, None
        assert pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        for fd in (self._jobs, self._answers):
            with contextlib.suppress(OSError):
                os.close(fd)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        return "it was stopped" if killed else _ended(status)


def _close_all_but(*keep: int) -> None:
    """Close every descriptor above stderr but ``keep`` (those open, where /proc lists them:
    a loop to the descriptor limit is a million system calls under an emulator)."""
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = list(range(3, os.sysconf("SC_OPEN_MAX")))
    for fd in open_fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _write_frame(fd: int, data: bytes) -> None:
    view = memoryview(len(data).to_bytes(8, "little") + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_frame(fd: int, deadline: float | None) -> bytes | None:
    """One length-prefixed message from ``fd``; ``None`` at end of file; ``_Hung`` past ``deadline``."""
    head = _read_exactly(fd, 8, deadline)
    if head is None:
        return None
    body = _read_exactly(fd, int.from_bytes(head, "little"), deadline)
    return body


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _Hung
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def pack_arrays(arrays: Arrays) -> bytes:
    """Named numpy arrays as bytes, for a child to send back (``unpack_arrays``)."""
    import numpy as np

    out = io.BytesIO()
    names = list(arrays)
    header = json.dumps(names).encode()
    out.write(len(header).to_bytes(4, "little") + header)
    for name in names:
        np.save(out, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    return out.getvalue()


def unpack_arrays(data: bytes) -> Arrays:
    import numpy as np

    size = int.from_bytes(data[:4], "little")
    names = json.loads(data[4 : 4 + size])
    inp = io.BytesIO(data[4 + size :])
    return {name: np.load(inp, allow_pickle=False) for name in names}
