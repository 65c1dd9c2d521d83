"""Run native code that may kill the process in a forked child, and take back its result.

onnxruntime-genai's image decoder (libjpeg inside onnxruntime-extensions) answers some
corrupt JPEGs — a marker in the middle of the image data — with libjpeg's default fatal
error handler, ``exit(1)``, not an exception: a server would die of one bad upload. So
the engine decodes pictures in a ``fork()`` of itself: the child shares the loaded model
copy-on-write, runs og's processor, writes the arrays to a pipe and exits; a child that
dies instead becomes one clear error. The parent never decodes a picture itself.

``fork`` is safe here because the engine runs one generation at a time: no other thread
is inside onnxruntime while the child is made, and the child calls only the processor
(image decoding and resizing on the calling thread) before ``os._exit``.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

Arrays = dict[str, Any]  # name -> numpy array
TIMEOUT_S = 300.0  # a 67-megapixel photo on a Raspberry Pi takes seconds, not minutes
EXITED = 70  # the child called exit() from native code (libjpeg's fatal error handler)


class ChildDied(Exception):
    """The forked child ended without a result; ``str()`` says how."""


class ChildFailed(Exception):
    """The forked child raised; ``str()`` is its message."""


def available() -> bool:
    return hasattr(os, "fork")


def _exit_at_exit(code: int) -> Any:
    """Make C ``exit()`` in this (forked) process end it at once, skipping the atexit handlers.

    libjpeg's fatal errors call ``exit(1)``; the handlers that would then run include
    onnxruntime's static destructors, which wait on threads that do not exist in a forked
    child and hang it for ever. Registered last, this runs first.
    """
    import ctypes

    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _arg: os._exit(code))
    try:
        # glibc and bionic export atexit() only as __cxa_atexit(void (*)(void *), void *, void *).
        ctypes.CDLL(None).__cxa_atexit(callback, None, None)
    except (AttributeError, OSError):
        return None  # no such hook here: the parent's timeout still ends a child that hangs
    return callback  # keep it alive


def run_forked(work: Callable[[], Arrays], timeout: float = TIMEOUT_S) -> Arrays:
    """``work()`` in a child process; its named arrays, or ``ChildFailed``/``ChildDied``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_fd)
            # libjpeg prints its warnings to stderr; the parent reports one line instead.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            keep = _exit_at_exit(EXITED)
            try:
                message = b"K" + _pack(work())
            except Exception as exc:
                message = b"E" + str(exc).encode("utf-8", "replace")[:2000]
            with os.fdopen(write_fd, "wb") as out:
                out.write(message)
            del keep
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
                raise ChildDied(f"no result within {timeout:.0f} s")
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
