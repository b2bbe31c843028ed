"""OS errors are the user's environment, not bugs: each becomes one line naming the path and the cause.

Why a module: the same full disk reaches us as an `OSError` from Python's own writes, as a
`SafetensorError` whose text ends in "(os error 28)" from safetensors' Rust writer, and wrapped in
a `CheckpointException` from torch.distributed.checkpoint. Every output mode and both CLIs must
say the same thing about it: what happened, to which path, and what would help.
"""

from __future__ import annotations

import errno
import os
import re

from .errors import UpcycleError

_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")

# what helps, per cause (the message already names the path)
HINTS = {
    errno.ENOSPC: "free space on that filesystem or choose another output folder (-o)",
    errno.EDQUOT: "the disk quota is used up; free space or choose another output folder (-o)",
    errno.EACCES: "no permission to write there; choose another output folder (-o) or fix the folder's permissions",
    errno.EPERM: "the operation is not permitted there; choose another output folder (-o)",
    errno.EROFS: "the filesystem is read-only; choose another output folder (-o)",
    errno.ENOENT: "a folder on the way does not exist (or was removed while writing); choose another output folder (-o)",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another output folder (-o)",
    errno.EISDIR: "a folder is in the way of a file; choose another output folder (-o)",
    errno.EMFILE: "too many open files in this process; raise the limit (ulimit -n) and run again",
    errno.ENFILE: "too many open files on the system; close other programs and run again",
    errno.EFBIG: "a file is larger than the filesystem or the process's file-size limit (ulimit -f) allows; "
                 "choose another output folder (-o), or a smaller --max-shard-size",
    errno.ENAMETOOLONG: "the path is too long for the filesystem; choose a shorter output path",
    errno.EIO: "the device reported an I/O error; check the disk, or choose another output folder (-o)",
    errno.ENOMEM: "the system ran out of memory; see the pre-flight estimate (--dry-run), or use --stream",
}


class OutputError(UpcycleError, OSError):
    """Writing the output failed because of the environment (disk full, permissions, read-only
    filesystem, ...). Both an UpcycleError (one line, exit 2) and an OSError (code that already
    catches OSError, like transformers' Trainer, keeps working); `errno` is the cause's."""

    def __init__(self, message: str, errno_: int | None = None, filename: str | None = None):
        UpcycleError.__init__(self, message)
        self.errno = errno_
        self.strerror = os.strerror(errno_) if errno_ else None
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return (type(self), (self.args[0], self.errno, self.filename))


def as_os_error(exc: BaseException) -> OSError | None:
    """The OS error inside `exc`: itself, a safetensors error's "(os error N)", or the cause of a
    wrapping exception (DCP's CheckpointException keeps per-rank failures); None if none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and not isinstance(exc, UpcycleError):
            return exc
        m = _OS_ERROR_IN_TEXT.search(str(exc))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for value in failures.values():
                inner = value[0] if isinstance(value, tuple) else value
                if isinstance(inner, BaseException):
                    found = as_os_error(inner)
                    if found is not None:
                        return found
        exc = exc.__cause__ or exc.__context__
    return None


def describe(err: OSError, path=None, *, doing: str = "") -> str:
    """'PATH: cause (while doing); what helps' on one line."""
    where = path if path is not None else (err.filename or "")
    cause = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    hint = HINTS.get(err.errno, "")
    text = f"{where}: {cause}" if where else cause
    if doing:
        text += f" (while {doing})"
    return text + (f"; {hint}" if hint else "")


def output_error(exc: BaseException, path, *, doing: str = "writing the output", note: str = "") -> OutputError | None:
    """The OutputError for an OS failure inside `exc` while writing `path`, or None if `exc` is not one."""
    err = as_os_error(exc)
    if err is None:
        return None
    return OutputError(describe(err, path, doing=doing) + (f"; {note}" if note else ""), err.errno, str(path))


__all__ = ["OutputError", "as_os_error", "describe", "output_error", "HINTS"]
