"""Reading a checkpoint ahead of the converter: the kernel fetches the next tensors from disk while
the converter imports the model's code, traces it and maps the layers before them.

Why: a streamed conversion reads its input in one pass, tensor by tensor, and until the first
tensor is needed it spends seconds importing the model's code and tracing it (measured: 2 s of a
10 s conversion of a 1.8 GB Llama). With a cold page cache the reads then wait on the disk one
after the other (read 2.9-3.8 s cold vs 1.2 s warm on the same model). Asking the kernel for the
coming byte ranges (`posix_fadvise(WILLNEED)`, which queues the reads and returns) lets the disk
work during the plan and under the mapping instead.

Bounded: the thread stays at most `window_bytes` ahead of what the reader has consumed, so a
checkpoint far larger than memory never floods the page cache (and page cache is not the
process's resident memory: the RSS bound of streaming is untouched). Nothing is read into the
process; where `posix_fadvise` does not exist (macOS, Windows) this does nothing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

READAHEAD_BYTES = 1 << 30  # how far ahead of the reader the kernel is asked to read
# Linux reads at most the device's readahead size (queue/read_ahead_kb) per WILLNEED request,
# whatever the range asked for (measured here: one 1 GB request cached 9 MB, 8 MB requests 946 MB),
# so requests are cut to that size; 128 KB is the kernel's default where it cannot be read
DEFAULT_REQUEST_BYTES = 128 << 10


class Readahead:
    """Asks the kernel for `spans` [(file, offset, nbytes)] in order, staying at most
    `window_bytes` ahead of the bytes reported through `consumed`."""

    def __init__(self, spans: list[tuple[Path, int, int]], window_bytes: int = READAHEAD_BYTES):
        merged = _merged(spans)
        self._spans = _chunks(merged, request_bytes(merged[0][0]) if merged else DEFAULT_REQUEST_BYTES)
        self._window = window_bytes
        self._issued = 0  # bytes the kernel was asked for
        self._consumed = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread = None
        if hasattr(os, "posix_fadvise") and self._spans:
            self._thread = threading.Thread(target=self._run, name="upcycle-readahead", daemon=True)
            self._thread.start()

    @property
    def requested_bytes(self) -> int:
        return self._issued

    def consumed(self, nbytes: int) -> None:
        with self._cond:
            self._consumed += nbytes
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            for path, offset, nbytes in self._spans:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or self._issued - self._consumed < self._window)
                    if self._stop:
                        return
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)  # queues the reads, returns
                self._issued += nbytes
        except OSError:
            return  # a hint only: the reader reports real read errors itself
        finally:
            for fd in fds.values():
                os.close(fd)


def request_bytes(path: Path) -> int:
    """The readahead size of the block device holding `path` (the most one WILLNEED request reads)."""
    try:
        dev = os.stat(path).st_dev
        node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        for queue in (node / "queue", node.resolve().parent / "queue"):  # a disk, or a partition of one
            f = queue / "read_ahead_kb"
            if f.is_file():
                return max(int(f.read_text()), 4) << 10
    except (OSError, ValueError, AttributeError):  # AttributeError: no os.major (Windows)
        pass
    return DEFAULT_REQUEST_BYTES


def _merged(spans: list[tuple[Path, int, int]]) -> list[tuple[Path, int, int]]:
    """Adjacent ranges of one file (consecutive tensors) as one range, order kept."""
    out: list[list] = []
    for path, offset, nbytes in spans:
        if nbytes <= 0:
            continue
        if out and out[-1][0] == path and out[-1][1] + out[-1][2] == offset:
            out[-1][2] += nbytes
        else:
            out.append([path, offset, nbytes])
    return [tuple(s) for s in out]


def _chunks(spans, size: int) -> list[tuple[Path, int, int]]:
    out = []
    for path, offset, nbytes in spans:
        for start in range(0, nbytes, size):
            out.append((path, offset + start, min(size, nbytes - start)))
    return out


__all__ = ["Readahead", "READAHEAD_BYTES"]
