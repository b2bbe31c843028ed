"""Integrity of an output folder on load: every file against the manifest's size and sha256.

Why: `upcycle.json` records each file's size and sha256 when the folder is written; a flipped byte
(a bad disk, an interrupted copy, an edited file) must stop `upcycle.load` with the file's name
instead of loading a silently different model. Checking is on by default (`verify=False` skips)
and runs at disk speed: files are read in large blocks with the next block read on a thread while
the current one is hashed (sha256 and file reads both release the GIL), and files are hashed two at
a time. The manifest is only as trustworthy as the folder: this detects damage, not a forger who
rewrites the manifest too.

File names from a manifest or a shard index are used only if they are plain names inside the
folder (no separators, no `..`), so a hostile folder cannot make us read elsewhere.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import ModelError

BLOCK = 8 << 20


def plain_name(name, where) -> str:
    """`name` if it is a plain file name (what our writers produce); ModelError naming `where` otherwise."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name or os.path.isabs(name):
        raise ModelError(f"{where}: names the file {name!r}, which is not a plain file name inside the folder; "
                         "refusing to read outside it")
    return name


def sha256_file(path: Path, block: int = BLOCK) -> tuple[int, str]:
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


def manifest_files(manifest: dict, where) -> dict[str, dict]:
    """The manifest's {file name: {"bytes", "sha256"?}}, checked for shape and plain names."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ModelError(f"{where}: has no `files` table (file name -> bytes and sha256); the manifest is damaged")
    for name, entry in files.items():
        plain_name(name, where)
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or \
                ("sha256" in entry and not isinstance(entry["sha256"], str)):
            raise ModelError(f"{where}: the entry for {name!r} is {entry!r}; expected bytes (an integer) and sha256")
    return files


def verify_folder(folder: Path, manifest: dict, *, manifest_name: str = "upcycle.json",
                  needed: list[str] = ()) -> None:
    """Every file the manifest lists has its recorded size and sha256 (where recorded); every name
    in `needed` (what the loader will read) is listed. ModelError names the first bad file."""
    folder = Path(folder)
    where = folder / manifest_name
    files = manifest_files(manifest, where)
    for name in needed:
        if name not in files:
            raise ModelError(f"{folder / name}: not listed in {manifest_name}, so it was added or replaced after the "
                             "folder was written; refusing to load it (upcycle.load(..., verify=False) skips the check)")
    jobs = []
    for name, entry in files.items():
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            raise ModelError(f"{path}: listed in {manifest_name} but missing; copy the whole folder") from None
        if not path.is_file():
            raise ModelError(f"{path}: listed in {manifest_name} but not a regular file")
        if st.st_size != entry["bytes"]:
            raise ModelError(f"{path}: is {st.st_size} bytes but {manifest_name} records {entry['bytes']}; the file is "
                             "truncated or was changed (an incomplete copy?); re-copy or re-create the folder")
        if "sha256" in entry:
            jobs.append((name, path, entry["sha256"]))
    jobs.sort(key=lambda j: -(folder / j[0]).stat().st_size)  # the largest first: two threads stay busy
    with ThreadPoolExecutor(2, thread_name_prefix="upcycle-hash") as pool:
        results = list(pool.map(lambda j: (j, _hash(j[1])), jobs))
    for (name, path, want), got in results:
        if got != want:
            raise ModelError(f"{path}: sha256 {got[:16]}… differs from {want[:16]}… recorded in {manifest_name}; the "
                             "file is damaged or was changed after it was written; re-copy or re-create the folder "
                             "(upcycle.load(..., verify=False) skips the check)")


def _hash(path: Path) -> str:
    try:
        return sha256_file(path)[1]
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None


def file_entries(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the regular files in `folder` (for a manifest)."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.name not in skip:
            out[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)[1]}
    return out


__all__ = ["verify_folder", "sha256_file", "plain_name", "manifest_files", "file_entries"]
