"""Resumable downloads for updates, with only the standard library.

A file is fetched into ``<dest>.part``. If a ``.part`` is already there — an earlier run
was interrupted — the request asks for the rest with ``Range`` and ``If-Range`` (the ETag
or Last-Modified the first response carried, kept in ``<dest>.part.meta``). A server that
answers 206 gets the rest appended; one that ignores Range, or whose file changed, answers
200 and the download restarts from zero. The finished file's size and sha256 must match
what the signed index or manifest promised before it is renamed to ``dest``.

A link that stalls or dribbles is given up (the ``.part`` kept for the next try): each
read waits at most ``TIMEOUT_S``, each ``Pace.window`` must bring ``Pace.min_rate`` bytes a
second on average, and a whole update has ``Pace.deadline`` seconds — so a hostile or
broken server cannot hold the update lock for long.

``http(s)://`` and ``file://`` URLs work, and so does a plain folder path (a USB stick).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgephi.core.errors import DownloadError, IntegrityError
from edgephi.core.fsutil import sha256_file

_CHUNK = 1 << 16
TIMEOUT_S = 60
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Pace:
    """How slow an update's downloads may be before they are given up."""

    min_rate: int = 1024  # bytes a second, averaged over each window
    window: float = 30.0  # seconds
    deadline: float = 3600.0  # seconds for all the downloads of one update

    def clock(self) -> float:
        """The monotonic time by which downloads started now must be done."""
        return time.monotonic() + self.deadline


DEFAULT_PACE = Pace()


def join(base: str, rel: str) -> str:
    """The URL of ``rel`` inside the channel at ``base`` (a URL or a folder path)."""
    if "://" not in base:
        base = Path(base).resolve().as_uri()
    return urllib.parse.urljoin(base.rstrip("/") + "/", rel)


def _open(url: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    request = urllib.request.Request(url, headers={"User-Agent": "edgephi-updater", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot fetch {url}: {reason}") from None


class _Meter:
    """Counts a download's bytes against its ``Pace``; raises ``DownloadError`` when too slow."""

    def __init__(self, url: str, pace: Pace, until: float) -> None:
        self.url, self.pace, self.until = url, pace, until
        self.window_start, self.window_bytes = time.monotonic(), 0

    def add(self, count: int, kept: str = "nothing kept") -> None:
        now, pace = time.monotonic(), self.pace
        self.window_bytes += count
        if now > self.until:
            raise DownloadError(
                f"the update ran past its deadline of {pace.deadline:.0f} s during {self.url} ({kept})"
            )
        elapsed = now - self.window_start
        if elapsed >= pace.window:
            if self.window_bytes < pace.min_rate * elapsed:
                raise DownloadError(
                    f"the download of {self.url} is too slow: {self.window_bytes} bytes in the last "
                    f"{elapsed:.0f} s, under {pace.min_rate} bytes/s ({kept})"
                )
            self.window_start, self.window_bytes = now, 0


def fetch_bytes(url: str, limit: int, pace: Pace = DEFAULT_PACE, until: float | None = None) -> bytes:
    meter = _Meter(url, pace, pace.clock() if until is None else until)
    data = bytearray()
    with _open(url) as resp:
        while len(data) <= limit:
            try:
                chunk = resp.read1(limit + 1 - len(data))
            except OSError as exc:
                raise DownloadError(f"download of {url} broke off: {exc}") from None
            if not chunk:
                break
            data += chunk
            meter.add(len(chunk))
    if len(data) > limit:
        raise DownloadError(f"{url} is larger than the {limit} bytes allowed")
    return bytes(data)


def fetch_optional(
    url: str, limit: int, pace: Pace = DEFAULT_PACE, until: float | None = None
) -> bytes | None:
    try:
        return fetch_bytes(url, limit, pace, until)
    except DownloadError:
        return None


def fetch_file(
    url: str,
    dest: Path,
    size: int,
    sha256: str,
    progress: Progress | None = None,
    on_chunk: Callable[[], None] | None = None,
    pace: Pace = DEFAULT_PACE,
    until: float | None = None,
) -> int:
    """Download ``url`` to ``dest`` (resuming a ``.part``); return the bytes transferred now.

    ``until`` (a ``time.monotonic()`` value, default ``pace.clock()`` now) ends the download
    with ``DownloadError`` when passed, as does a window slower than ``pace.min_rate``.
    """
    until = pace.clock() if until is None else until
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.meta")
    have = part.stat().st_size if part.exists() else 0
    validator = _read_meta(meta) if have else None
    if have > size:
        have, validator = 0, None
    headers = {}
    if have and validator:
        headers = {"Range": f"bytes={have}-", "If-Range": validator}
    transferred = 0
    with _open(url, headers) as resp:
        status = getattr(resp, "status", None) or 200
        if status == 206 and have:
            mode = "ab"
        else:
            # The server ignored Range, or the file changed since the .part began: start over.
            have, mode = 0, "wb"
        new_validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if new_validator:
            meta.write_text(json.dumps({"validator": new_validator}))
        meter = _Meter(url, pace, until)
        with open(part, mode) as out:
            while True:
                try:
                    # read1: what has arrived (one receive), so a dribble is seen as one.
                    chunk = resp.read1(_CHUNK)
                except OSError as exc:
                    raise DownloadError(f"download of {url} broke off: {exc}") from None
                if not chunk:
                    break
                if have + transferred + len(chunk) > size:
                    raise IntegrityError(f"{url} is larger than the {size} bytes it was announced as")
                out.write(chunk)
                transferred += len(chunk)
                if progress:
                    progress(have + transferred, size)
                if on_chunk:
                    out.flush()
                    on_chunk()
                meter.add(len(chunk), f"{have + transferred} of {size} bytes kept for the next try")
            out.flush()
            os.fsync(out.fileno())
    if have + transferred < size:
        # A clean close before the end (a proxy, a mobile link): keep the .part to resume.
        raise DownloadError(f"the download of {url} broke off after {have + transferred} of {size} bytes")
    _check_and_finish(part, meta, dest, size, sha256, url)
    return transferred


def _read_meta(meta: Path) -> str | None:
    try:
        value = json.loads(meta.read_text())["validator"]
        return value if isinstance(value, str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_and_finish(part: Path, meta: Path, dest: Path, size: int, sha256: str, url: str) -> None:
    actual_size = part.stat().st_size
    actual = sha256_file(part)
    if actual_size != size or actual != sha256:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise IntegrityError(
            f"{url}: downloaded {actual_size} bytes with sha256 {actual[:12]}…, "
            f"expected {size} bytes with {sha256[:12]}…"
        )
    os.replace(part, dest)
    with contextlib.suppress(OSError):
        meta.unlink()


def terminal_progress(label: str) -> Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""
    if not sys.stderr.isatty():
        return lambda done, total: None

    def show(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        bar = "#" * (pct // 4)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{label} [{bar:<25}] {pct:3d}% {done / 1e6:.1f}/{total / 1e6:.1f} MB{end}")
        sys.stderr.flush()

    return show
