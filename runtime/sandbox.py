"""Run native code that may kill the process in a forked child, and take back its result.

onnxruntime-genai's image decoder (libjpeg inside onnxruntime-extensions) answers some
corrupt JPEGs — a marker in the middle of the image data — with libjpeg's default fatal
error handler, ``exit(1)``, not an exception: a server would die of one bad upload. So
the engine decodes pictures in a ``fork()`` of itself: the child shares the loaded model
copy-on-write, runs og's processor, writes the arrays to a pipe and exits; a child that
dies instead becomes one clear error. The parent never decodes a picture itself.

``fork`` is safe here because the engine runs one generation at a time: no other thread
is inside onnxruntime while the child is made, and the child calls only the processor
(image decoding and resizing on the calling thread) before ``os._exit``. What a child of a
threaded process must not do, it does not: it never runs the garbage collector (a finalizer
of some unrelated onnxruntime object would wait on threads the child does not have), and
the exit hook it needs is made in the parent, so the child neither ``dlopen``s nor builds a
ctypes closure (both take process-wide locks another thread may have held at the fork). A
child that still hangs — a lock inherited from some other library's thread — is killed
after a deadline sized to its picture and tried once more before the picture is refused.
"""

from __future__ import annotations

import gc
import io
import json
import os
import select
import signal
import time
from collections.abc import Callable
from functools import cache
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


@cache
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


def run_forked(work: Callable[[], Arrays], timeout: float, tries: int = 2) -> Arrays:
    """``work()`` in a child process; its named arrays, or ``ChildFailed``/``ChildDied``.

    A child with no result after ``timeout`` seconds is killed and, ``tries`` times in all,
    made again: a hang inherited from another thread's lock does not recur in a new fork.
    """
    for attempt in range(tries):
        try:
            return _run_child(work, timeout)
        except _Hung:
            if attempt == tries - 1:
                raise ChildDied(f"no result within {timeout:.0f} s, {tries} times") from None
    raise AssertionError("unreachable")


class _Hung(Exception):
    pass


def _run_child(work: Callable[[], Arrays], timeout: float) -> Arrays:
    hook = _exit_hook()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            gc.disable()
            os.close(read_fd)
            # libjpeg prints its warnings to stderr; the parent reports one line instead.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            if hook is not None:
                register, callback = hook
                register(callback, None, None)
            try:
                message = b"K" + _pack(work())
            except Exception as exc:
                message = b"E" + str(exc).encode("utf-8", "replace")[:2000]
            with os.fdopen(write_fd, "wb") as out:
                out.write(message)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    with os.fdopen(read_fd, "rb", buffering=0) as inp:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([inp], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise _Hung
            chunk = inp.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise ChildDied(f"a crash, signal {os.WTERMSIG(status)}")
    code = os.WEXITSTATUS(status)
    if code != 0 or not data:
        raise ChildDied("a fatal decoding error" if code == EXITED else f"exit status {code}")
    if data[:1] == b"E":
        raise ChildFailed(data[1:].decode("utf-8", "replace"))
    return _unpack(data[1:])


def _pack(arrays: Arrays) -> bytes:
    import numpy as np

    out = io.BytesIO()
    names = list(arrays)
    header = json.dumps(names).encode()
    out.write(len(header).to_bytes(4, "little") + header)
    for name in names:
        np.save(out, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    return out.getvalue()


def _unpack(data: bytes) -> Arrays:
    import numpy as np

    size = int.from_bytes(data[:4], "little")
    names = json.loads(data[4 : 4 + size])
    inp = io.BytesIO(data[4 + size :])
    return {name: np.load(inp, allow_pickle=False) for name in names}
