"""sha256 of files at disk speed, and checking a folder against recorded sizes and hashes.

Why here: both the compiler's output folders (upcycle.json) and the training checkpoints
(checksums.json beside DCP's files) record what each file must be, and a flipped byte must stop the
load with the file's name; the runtime must work without the compiler, so the shared part lives
here. Speed: files are read in 8 MB blocks with the next block read on a thread while the current
one is hashed (file reads and sha256 both release the GIL), and up to two files are hashed at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK = 8 << 20
CHECKSUMS = "checksums.json"  # in a training checkpoint folder


class ChecksumError(ValueError):
    """A file differs from what was recorded when it was written (message names the file)."""


def sha256_file(path, block: int = BLOCK) -> tuple[int, str]:
    """(bytes read, sha256 hex) of `path`, reading the next block while hashing the current one."""
    h = hashlib.sha256()
    size = 0
    bufs = [bytearray(block), bytearray(block)]
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="upcycle-read") as pool:
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        i = 0
        pending = pool.submit(f.readinto, bufs[0])
        while True:
            n = pending.result()
            if not n:
                break
            current = bufs[i]
            i ^= 1
            pending = pool.submit(f.readinto, bufs[i])
            h.update(memoryview(current)[:n])
            size += n
    return size, h.hexdigest()


def file_entries(folder, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the regular files directly in `folder`."""
    paths = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name not in skip]
    with ThreadPoolExecutor(2, thread_name_prefix="upcycle-hash") as pool:
        digests = list(pool.map(lambda p: sha256_file(p)[1], paths))
    return {p.name: {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(paths, digests)}


def check_files(folder, files: dict[str, dict], recorded_in: str, hint: str = "") -> None:
    """Each of `files` ({plain name: {"bytes", "sha256"?}}) is in `folder` with that size and
    sha256; ChecksumError naming the first that is not. `hint`: how to skip the check."""
    folder = Path(folder)
    tail = f"; re-copy or re-create it{f' ({hint})' if hint else ''}"
    jobs = []
    for name, entry in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            raise ChecksumError(f"{path}: listed in {recorded_in} but missing; copy the whole folder") from None
        if not path.is_file():
            raise ChecksumError(f"{path}: listed in {recorded_in} but not a regular file")
        if size != entry["bytes"]:
            raise ChecksumError(f"{path}: is {size} bytes but {recorded_in} records {entry['bytes']}: truncated or "
                                f"changed after it was written (an incomplete copy?){tail}")
        if entry.get("sha256"):
            jobs.append((size, path, entry["sha256"]))
    jobs.sort(key=lambda j: -j[0])  # the largest first: both threads stay busy

    def digest(job):
        try:
            return sha256_file(job[1])[1]
        except OSError as exc:
            raise ChecksumError(f"{job[1]}: cannot read ({exc.strerror or exc})") from None

    with ThreadPoolExecutor(2, thread_name_prefix="upcycle-hash") as pool:
        got = list(pool.map(digest, jobs))
    for (_, path, want), have in zip(jobs, got):
        if have != want:
            raise ChecksumError(f"{path}: sha256 {have[:12]}... differs from {want[:12]}... recorded in {recorded_in}: "
                                f"damaged or changed after it was written{tail}")


def write_checksums(folder) -> None:
    """checksums.json: every file of `folder` (a training checkpoint) with its size and sha256."""
    folder = Path(folder)
    (folder / CHECKSUMS).write_text(json.dumps(file_entries(folder, skip=(CHECKSUMS,)), indent=1))


def verify_checksums(folder) -> bool:
    """Check `folder` against its checksums.json; False if it has none (older checkpoints)."""
    folder = Path(folder)
    path = folder / CHECKSUMS
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())
        ok = isinstance(files, dict) and all(
            isinstance(n, str) and "/" not in n and n not in ("", ".", "..") and isinstance(e, dict)
            and isinstance(e.get("bytes"), int) for n, e in files.items())
    except (OSError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise ChecksumError(f"{path}: damaged (expected a JSON object of file name -> bytes and sha256)")
    check_files(folder, files, CHECKSUMS)
    return True


__all__ = ["sha256_file", "file_entries", "check_files", "write_checksums", "verify_checksums", "ChecksumError",
           "CHECKSUMS"]
