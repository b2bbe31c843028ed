"""The small JSON files of a model folder (config, shard index, manifest, run.json), read defensively.

Why: these files come from whoever made the folder. A FIFO or /dev/zero in place of config.json
would hang or fill memory, a 10 GB "config" would be read whole, and `[[[[...` a few hundred
thousand deep makes the json module raise RecursionError, which no caller expects. Each becomes
one ModelError naming the file and what would be valid.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import ModelError

MAX_JSON_BYTES = 64 << 20  # an index of a million tensors is ~60 MB; configs are kilobytes


def read_json(path, *, what: str = "JSON file", limit: int = MAX_JSON_BYTES, expect=dict):
    """The JSON value in `path` (of type `expect`, None: any), or ModelError saying why not."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file (expected the {what})") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{path}: is not a regular file (a device, pipe or socket?); the {what} must be a file")
        if st.st_size > limit:
            raise ModelError(f"{path}: is {st.st_size} bytes, too large for a {what} (at most {limit}); wrong file?")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    return parse_json(raw, path, what=what, expect=expect)


def parse_json(raw: bytes, where, *, what: str = "JSON", expect=dict):
    """`raw` parsed, or ModelError naming `where` (bad UTF-8, bad JSON, nested too deeply, wrong type)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelError(f"{where}: the {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ModelError(f"{where}: the {what} is nested too deeply to be valid") from None
    except ValueError as exc:
        raise ModelError(f"{where}: the {what} is not valid JSON ({exc})") from None
    if expect is not None and not isinstance(value, expect):
        raise ModelError(f"{where}: the {what} holds a JSON {type(value).__name__}; expected an object")
    return value


__all__ = ["read_json", "parse_json", "MAX_JSON_BYTES"]
