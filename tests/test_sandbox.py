"""The forked-child sandbox the engine decodes pictures in (``edgephi.runtime.sandbox``)."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np
import pytest
from edgephi.runtime import sandbox

pytestmark = pytest.mark.skipif(not sandbox.available(), reason="needs fork()")


def test_the_childs_arrays_come_back() -> None:
    got = sandbox.run_forked(lambda: {"a": np.arange(6).reshape(2, 3), "b": np.ones(3, np.float16)}, 30)
    assert got["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and got["b"].dtype == np.float16


def test_a_child_that_calls_c_exit_is_a_fatal_decoding_error_and_the_parent_lives() -> None:
    def work() -> dict[str, np.ndarray]:
        ctypes.CDLL(None).exit(1)  # what libjpeg's fatal error handler does
        raise AssertionError("exit() returned")

    with pytest.raises(sandbox.ChildDied, match="a fatal decoding error"):
        sandbox.run_forked(work, 30)


def test_a_childs_exception_comes_back_as_its_message() -> None:
    def work() -> dict[str, np.ndarray]:
        raise ValueError("no such format")

    with pytest.raises(sandbox.ChildFailed, match=r"^no such format$"):
        sandbox.run_forked(work, 30)


def test_a_child_that_hangs_once_is_made_again(tmp_path: Path) -> None:
    # The first child marks the file and hangs, as a child that inherited a held lock would;
    # the second finds the mark and answers.
    mark = tmp_path / "hung"

    def work() -> dict[str, np.ndarray]:
        if not mark.exists():
            mark.touch()
            time.sleep(3600)
        return {"ok": np.array([1])}

    start = time.monotonic()
    assert sandbox.run_forked(work, 2)["ok"].tolist() == [1]
    assert mark.exists() and 2 <= time.monotonic() - start < 30


def test_a_child_that_always_hangs_is_killed_and_refused() -> None:
    start = time.monotonic()
    with pytest.raises(sandbox.ChildDied, match="no result within 1 s, 2 times"):
        sandbox.run_forked(lambda: time.sleep(3600) or {}, 1)
    assert time.monotonic() - start < 20


def test_a_deadline_grows_with_the_picture() -> None:
    assert 120 <= sandbox.deadline_for(64 * 48) < 121
    assert 350 < sandbox.deadline_for(64 * 2**20) < 450  # the largest picture a device decodes
