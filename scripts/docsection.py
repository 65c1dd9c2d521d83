"""Marked sections of a generated document, so that two benchmark scripts can share one file.

``docs/benchmarks.md`` is written whole by ``bench_vs_llamacpp.py``; other scripts own a
section of it between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``, which they
replace (``replace``) and which a rewrite of the rest keeps (``keep``).
"""

from __future__ import annotations

import re


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- begin {re.escape(name)} -->\n.*?<!-- end {re.escape(name)} -->\n", re.DOTALL)


def block(name: str, body: str) -> str:
    return f"<!-- begin {name} -->\n{body.rstrip()}\n<!-- end {name} -->\n"


def replace(text: str, name: str, body: str) -> str:
    """``text`` with section ``name`` holding ``body``: in place if it is there, else appended."""
    new = block(name, body)
    if _pattern(name).search(text):
        return _pattern(name).sub(lambda _: new, text, count=1)
    return text.rstrip() + "\n\n" + new


def keep(old: str, new: str) -> str:
    """``new`` followed by every marked section of ``old`` that ``new`` lacks."""
    out = new
    for name in re.findall(r"<!-- begin (\S+) -->", old):
        found = _pattern(name).search(old)
        if found and not _pattern(name).search(out):
            out = out.rstrip() + "\n\n" + found.group(0)
    return out
