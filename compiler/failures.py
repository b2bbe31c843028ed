"""How the command-line tools end: exit codes and the one line they print for each kind of failure.

Why one place: `upcycle-compile` and `upcycle-export-run` must agree that a user mistake or the
environment (bad input, a full disk, no permission, too little memory) is one line and exit 2, an
interruption exit 130 (SIGTERM 143), and only a bug exit 1; and that nothing from the input (a
tensor name, a path) can break the line or send escape sequences to the terminal.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every clean-up that handles an interruption handles it too."""


def _on_sigterm(signum, frame):
    raise Terminated()


def install_sigterm() -> None:
    """SIGTERM ends a CLI run the way Ctrl-C does (temp folders removed), with exit 143."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main thread
        pass


def end_process(code: int) -> NoReturn:
    """Exit now with `code`, without the interpreter's shutdown.

    Why: the work is over (every output closed, synced and renamed into place, or removed), and
    shutdown has two failure modes of its own. It first puts back the default signal dispositions,
    so a Ctrl-C or SIGTERM landing in its last fraction of a second killed the process by the
    signal (exit -2 / -15, no message) after the run had finished or already reported. And after an
    interruption, threads of torch or of the shard writer can still be in C++ when shutdown ends
    them, which aborts the process ("terminate called without an active exception", exit -6) after
    the one-line message. Ignoring both signals, flushing the two streams and `os._exit` leaves
    neither window."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach the reader
            pass
    os._exit(code)


def run_as_process(prog: str, body) -> NoReturn:
    """Run a command-line tool's `body()` (returning its exit code) as the whole process: SIGTERM
    ends it like Ctrl-C; once an output is in place further interrupts are ignored (the run only
    prints its last line, and must not report a complete output as not written); the exit is
    `end_process`'s."""
    from .atomic import end_interrupts_at_commit

    install_sigterm()
    end_interrupts_at_commit()
    try:
        code = body()
    except KeyboardInterrupt as exc:  # outside the body's own handling (argument parsing)
        code = report(prog, exc)
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_INTERNAL_ERROR)
    end_process(code)


def printable(text: str, *, lines: bool = False) -> str:
    """`text` with control characters shown as escapes (a hostile name must not drive the
    terminal); newlines too unless `lines` (a multi-error spec message keeps one error a line)."""
    out = []
    for ch in str(text):
        if ch == "\n" and lines:
            out.append(ch)
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


MAX_LINE = 2000  # a hostile name (a 50 MB tensor name) must not become a 50 MB line


def fail(prog: str, message: str, code: int, *, lines: bool = False) -> int:
    text = printable(message, lines=lines)
    if len(text) > MAX_LINE and not lines:
        text = text[:MAX_LINE] + "..."
    print(f"{prog}: error: {text}", file=sys.stderr)
    return code


def out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's allocator failing (a RuntimeError "can't allocate memory", CUDA OOM)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))


def report(prog: str, exc: BaseException, *, debug: bool = False, what: str = "no output was written") -> int:
    """Print the line for `exc` and return the exit code (re-raise it with --debug, except interrupts)."""
    from upcycle.specs.errors import SpecError

    from .errors import UpcycleError
    from .os_errors import as_os_error, describe

    if isinstance(exc, KeyboardInterrupt):
        if isinstance(exc, Terminated):
            return fail(prog, f"terminated (SIGTERM); {what}", EXIT_TERMINATED)
        return fail(prog, f"interrupted; {what}", EXIT_INTERRUPTED)
    if debug:
        raise exc
    if isinstance(exc, UpcycleError):
        return fail(prog, str(exc), EXIT_USER_ERROR, lines=isinstance(exc, SpecError))
    if out_of_memory(exc):
        return fail(prog, "out of memory; the pre-flight estimate (--dry-run) shows what the work needs: try --stream, "
                          f"a smaller experts.expansion, or fewer --probe-tokens; {what}", EXIT_USER_ERROR)
    err = as_os_error(exc) if isinstance(exc, Exception) else None
    if err is not None:
        return fail(prog, f"{describe(err)}; {what}", EXIT_USER_ERROR)
    from .errors import brief

    return fail(prog, f"internal error ({brief(exc, 500)}); re-run with --debug for the traceback",
                EXIT_INTERNAL_ERROR)


__all__ = ["report", "fail", "printable", "install_sigterm", "end_process", "run_as_process", "Terminated", "EXIT_OK", "EXIT_USER_ERROR",
           "EXIT_INTERNAL_ERROR", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]
