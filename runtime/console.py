"""The CLI boundary shared by ``edge-run`` and ``edge-pack``: errors become one line here.

Library code raises ``EdgeError`` subclasses; ``run_app`` catches them once and prints
``<prog>: error: <what is wrong> — <what to do>`` on stderr with exit status 1 (2 for a
bad option). Set ``EDGEPHI_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from edgephi.core.errors import ConfigError, EdgeError


def debug_enabled() -> bool:
    return os.environ.get("EDGEPHI_DEBUG", "") not in ("", "0", "false", "no")


def info(message: str) -> None:
    """Progress and notices go to stderr, so stdout carries only the answer or the data."""
    print(message, file=sys.stderr, flush=True)


def error_line(prog: str, exc: BaseException) -> str:
    if isinstance(exc, EdgeError):
        hint = f" — {exc.hint}" if exc.hint else ""
        return f"{prog}: error: {exc}{hint}"
    return f"{prog}: error: {type(exc).__name__}: {exc} — set EDGEPHI_DEBUG=1 for the traceback"


def fail(prog: str, exc: BaseException) -> NoReturn:
    print(error_line(prog, exc), file=sys.stderr, flush=True)
    raise SystemExit(2 if isinstance(exc, ConfigError) else 1)


def run_app(app: Any, prog: str, argv: Sequence[str]) -> None:
    """Run a typer app with edgephi's error policy: every failure is one line on stderr.

    Usage errors (an unknown option, a value that does not parse) too: typer would draw
    a box of several lines; here they say what is wrong and which ``--help`` to read,
    with exit status 2. Everything else that leaves the app is turned into one line by
    ``fail``.
    """
    import typer
    from typer.exceptions import TyperException

    try:
        result = app(args=list(argv), prog_name=prog, standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        print(file=sys.stderr)
        raise SystemExit(130) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except TyperException as exc:  # click's UsageError and friends, as typer ships them
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else prog
        message = " ".join(str(exc.format_message()).split())
        print(f"{prog}: error: {message} — see `{command} --help`", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as exc:
        if debug_enabled():
            raise
        fail(prog, exc)
    raise SystemExit(result if isinstance(result, int) else 0)
