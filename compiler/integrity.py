"""Integrity of an output folder on load: every file against the manifest's size and sha256.

Why: `upcycle.json` records each file's size and sha256 when the folder is written; a flipped byte
(a bad disk, an interrupted copy, an edited file) must stop `upcycle.load` with the file's name
instead of loading a silently different model. Checking is on by default (`verify=False` skips)
and runs at disk speed (runtime.checksums: read-ahead on a thread, two files at a time). The
manifest is only as trustworthy as the folder: this detects damage, not a forger who rewrites the
manifest too.

File names from a manifest or a shard index are used only if they are plain names inside the
folder (no separators, no `..`), so a hostile folder cannot make us read elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from upcycle.runtime.checksums import ChecksumError, check_files, file_entries, sha256_file  # noqa: F401

from .errors import ModelError

SKIP_HINT = "upcycle.load(..., verify=False) skips the check"


def plain_name(name, where) -> str:
    """`name` if it is a plain file name (what our writers produce); ModelError naming `where` otherwise."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name or os.path.isabs(name):
        raise ModelError(f"{where}: names the file {name!r}, which is not a plain file name inside the folder; "
                         "refusing to read outside it")
    return name


def manifest_files(manifest: dict, where) -> dict[str, dict]:
    """The manifest's {file name: {"bytes", "sha256"?}}, checked for shape and plain names."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ModelError(f"{where}: has no `files` table (file name -> bytes and sha256); the manifest is damaged")
    for name, entry in files.items():
        plain_name(name, where)
        if not isinstance(entry, dict) or type(entry.get("bytes")) is not int or \
                ("sha256" in entry and not isinstance(entry["sha256"], str)):
            raise ModelError(f"{where}: the entry for {name!r} is {entry!r}; expected bytes (an integer) and sha256")
    return files


def verify_folder(folder: Path, manifest: dict, *, manifest_name: str = "upcycle.json",
                  needed: list[str] = ()) -> None:
    """Every file the manifest lists has its recorded size and sha256; every name in `needed` (what
    the loader will read) is listed. ModelError names the first bad file."""
    folder = Path(folder)
    files = manifest_files(manifest, folder / manifest_name)
    for name in needed:
        if name not in files:
            raise ModelError(f"{folder / name}: not listed in {manifest_name}, so it was added or replaced after the "
                             f"folder was written; refusing to load it ({SKIP_HINT})")
    try:
        check_files(folder, files, manifest_name, hint=SKIP_HINT)
    except ChecksumError as exc:
        raise ModelError(str(exc)) from None


__all__ = ["verify_folder", "sha256_file", "file_entries", "plain_name", "manifest_files"]
