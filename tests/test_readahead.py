"""The checkpoint readahead of streamed conversion: requests in order, within the window, and
always stopped; a conversion asks the kernel for every input byte exactly once."""

import os
import threading
import time
from pathlib import Path

import pytest

import upcycle.compiler.readahead as ra
from upcycle.compiler.readahead import Readahead, _chunks, _merged


class Advice:
    """Records posix_fadvise calls instead of making them."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, int]] = []
        self.paths: list[str] = []
        monkeypatch.setattr(ra.os, "posix_fadvise", self._advise)

    def _advise(self, fd, offset, nbytes, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.calls.append((offset, nbytes))


def _wait_for(cond, timeout=5.0):
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            return False
        time.sleep(0.005)
    return True


def test_adjacent_ranges_merge_and_requests_are_cut_to_the_device_size(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    spans = [(a, 8, 10), (a, 18, 5), (a, 40, 4), (b, 0, 3), (b, 3, 0), (b, 3, 2)]
    assert _merged(spans) == [(a, 8, 15), (a, 40, 4), (b, 0, 5)]
    assert _chunks([(a, 8, 15)], 6) == [(a, 8, 6), (a, 14, 6), (a, 20, 3)]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux/Unix only")
def test_requests_stay_within_the_window_and_follow_the_reader(tmp_path, monkeypatch):
    advice = Advice(monkeypatch)
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * 100)
    monkeypatch.setattr(ra, "request_bytes", lambda path: 10)
    r = Readahead([(f, 0, 100)], window_bytes=30)
    try:
        assert _wait_for(lambda: len(advice.calls) == 3)
        time.sleep(0.05)
        assert advice.calls == [(0, 10), (10, 10), (20, 10)]  # 30 bytes ahead of nothing consumed: it waits
        r.consumed(25)
        assert _wait_for(lambda: len(advice.calls) == 6)
        time.sleep(0.05)
        assert len(advice.calls) == 6  # 60 requested, 25 consumed: the next would be 35 ahead
        r.consumed(75)
        assert _wait_for(lambda: len(advice.calls) == 10)
        assert advice.calls[-1] == (90, 10) and r.requested_bytes == 100
    finally:
        r.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux/Unix only")
def test_close_stops_a_waiting_thread_at_once(tmp_path, monkeypatch):
    Advice(monkeypatch)
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * 100)
    monkeypatch.setattr(ra, "request_bytes", lambda path: 10)
    r = Readahead([(f, 0, 100)], window_bytes=10)
    t0 = time.perf_counter()
    r.close()
    assert time.perf_counter() - t0 < 1.0
    assert not any(t.name == "upcycle-readahead" for t in threading.enumerate())


def test_the_device_readahead_size_is_read_from_sysfs(tmp_path):
    """Linux reads at most the device's readahead size per request; elsewhere the kernel default."""
    got = ra.request_bytes(tmp_path)
    if Path("/sys/dev/block").is_dir():
        dev = os.stat(tmp_path).st_dev
        node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        files = [q / "read_ahead_kb" for q in (node / "queue", node.resolve().parent / "queue") if (q / "read_ahead_kb").is_file()]
        want = (max(int(files[0].read_text()), 4) << 10) if files else ra.DEFAULT_REQUEST_BYTES
        assert got == want
    else:
        assert got == ra.DEFAULT_REQUEST_BYTES
    assert ra.request_bytes(tmp_path / "missing") == ra.DEFAULT_REQUEST_BYTES
