"""safetensors checkpoints without loading them: headers, validation, and an incremental writer.

Reading: every file's header is parsed and checked (a JSON header of sane length, offsets inside
the file, no integer weights where a float model is expected) before any tensor is touched, so a
truncated, corrupt or mismatched checkpoint fails with one message naming the file and tensor.
Tensors are then read one at a time through `safe_open` (memory-mapped).

Writing: `ShardWriter` knows every output tensor's name, dtype and shape up front (the rewrite is
planned on the meta device), so each shard's header is written first and tensor bytes follow as
they are produced (on a background thread); a sha256 of each file is computed while writing. Files follow the transformers
layout: `model.safetensors`, or `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.specs.errors import show_value

from .errors import ModelError
from .integrity import plain_name
from .jsonfiles import parse_json, read_json

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in ST_DTYPES.items()}
FLOAT_ST = {"F64", "F32", "F16", "BF16"}
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name: F32, BF16, I8, ...
    shape: tuple[int, ...]
    file: Path
    nbytes: int
    offset: int = 0  # absolute byte offset of the data in the file


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, after checking the header against the file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ModelError(f"{path}: is not a regular file (a device, pipe or socket?); expected a safetensors file")
        size = st.st_size
        with os.fdopen(fd, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: truncated safetensors file ({size} bytes; a valid file starts with an 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ModelError(f"{path}: corrupt or truncated safetensors file: header length {n} bytes, "
                                 f"but the file has {size} bytes (a valid file holds 8 + header + tensor data)")
            raw = f.read(n)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = parse_json(raw, path, what="safetensors header")
    except ModelError as exc:
        why = str(exc)[len(str(path)) + 2:]
        raise ModelError(f"{path}: corrupt safetensors header ({why}); the file is not a valid safetensors checkpoint") from None
    data_bytes = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype, str) or not isinstance(shape, list) or not all(
                    type(v) is int and v >= 0 for v in (*shape, start, end)) or start > end:
                raise ValueError
            shape = tuple(shape)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: corrupt safetensors header entry for {show_value(name)}: {show_value(entry)} "
                             "(expected dtype, a shape of non-negative integers and two data offsets)") from None
        if dtype not in ST_DTYPES:
            raise ModelError(f"{path}: tensor {name!r} has dtype {dtype}, which this tool cannot read "
                             f"(supported: {', '.join(sorted(ST_DTYPES))})")
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * ITEMSIZE[dtype] or start < 0:
            raise ModelError(f"{path}: corrupt safetensors header: tensor {name!r} {dtype}{list(shape)} needs "
                             f"{numel * ITEMSIZE[dtype]} bytes but its offsets span {end - start}")
        if end > data_bytes:
            raise ModelError(f"{path}: truncated safetensors file: the header declares tensor {name!r} up to byte "
                             f"{end} of the data section, but the file holds only {data_bytes} data bytes "
                             "(an incomplete download or copy?)")
        out[name] = TensorInfo(name, dtype, shape, path, end - start, 8 + n + start)
    return out


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a transformers directory (index or single file) or a single file."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / INDEX
    if index.is_file():
        weight_map = read_json(index, what="safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"{index}: not a valid safetensors index (needs a JSON object with a `weight_map` "
                             "of tensor name -> shard file)")
        files = sorted({plain_name(v, index) for v in weight_map.values()})
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelError(f"{index}: names shard {missing[0]!r}, which is not in {path}"
                             + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
                             + "; copy every shard listed in the index")
        return [path / f for f in files]
    odd = [p for p in sorted(path.glob("*.safetensors")) if not p.is_file()]
    if odd:
        raise ModelError(f"{odd[0]}: is not a regular file (a pipe, device or a link to one?); expected safetensors weights")
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors"))


def scan_checkpoint(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of a (sharded) checkpoint; headers checked; a name in two shards is an error."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in infos:
                raise ModelError(f"{f}: tensor {name!r} is also in {infos[name].file.name}; a checkpoint holds each tensor once")
            infos[name] = info
    return infos


def dominant_float_dtype(infos: dict[str, TensorInfo]) -> torch.dtype:
    count: dict[str, int] = {}
    for i in infos.values():
        if i.dtype in FLOAT_ST:
            count[i.dtype] = count.get(i.dtype, 0) + i.nbytes
    return ST_DTYPES[max(count, key=count.get)] if count else torch.float32


class TensorReader:
    """Reads tensors by name from a scanned checkpoint, one at a time.

    Each tensor is read with a positioned read into its own buffer (offsets from the checked header)
    rather than through a memory map of the whole file: pages of a mapping stay in the process's
    resident set until it is unmapped, so reading a 3 GB checkpoint through one mapping shows as
    3 GB of RSS even though each tensor is dropped after use."""

    def __init__(self, infos: dict[str, TensorInfo], seconds: PhaseSeconds | None = None, readahead=None):
        self.infos = infos
        self._files: dict[Path, object] = {}
        self.seconds = seconds  # its "read" field sums the time spent in get() (the streaming profile)
        self.readahead = readahead  # a readahead.Readahead, told what was consumed (its owner closes it)

    def get(self, name: str) -> torch.Tensor:
        with self.seconds.phase("read") if self.seconds is not None else contextlib.nullcontext():
            t = self._get(name)
        if self.readahead is not None:
            self.readahead.consumed(self.infos[name].nbytes)
        return t

    def _get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        dtype = ST_DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        f = self._files.get(info.file)
        try:
            if f is None:
                f = self._files[info.file] = open(info.file, "rb")
            # torch.empty, not bytearray: a bytearray is zero-filled first, a second pass over memory
            out = torch.empty(info.nbytes, dtype=torch.uint8)
            f.seek(info.offset)
            got = f.readinto(memoryview(out.numpy()))
        except OSError as exc:
            raise ModelError(f"{info.file}: cannot read tensor {name!r} ({exc.strerror or exc})") from None
        if got != info.nbytes:
            raise ModelError(f"{info.file}: truncated while reading tensor {name!r} ({got} of {info.nbytes} bytes); "
                             "the file changed or is incomplete")
        return out.view(dtype).reshape(info.shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


@dataclass
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Writes tensors, in the planned order, into shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own). Call `write(name, tensor)` for each planned tensor in order.

    The file writes, the sha256 and the fsyncs run on a background thread (all three release the
    GIL), so they overlap the mapping of the next tensors instead of adding to it; at most
    `max_pending_bytes` of produced tensors wait for the disk, which bounds the extra memory."""

    def __init__(self, folder: Path, plan: list[OutTensor], max_shard_bytes: int, metadata: dict | None = None,
                 max_pending_bytes: int = 64 << 20, seconds: IOSeconds | None = None):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[OutTensor]] = [[]]
        size = 0
        for t in plan:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.shards = shards
        self.order = [(k, t) for k, s in enumerate(shards) for t in s]
        self._pos = 0
        self._shard = -1
        self.files: dict[str, dict] = {}  # name -> {"bytes", "sha256"}
        self.total_bytes = sum(t.nbytes for t in plan)
        self._io = _BackgroundIO(max_pending_bytes, seconds or IOSeconds())

    def _header(self, k: int) -> bytes:
        header, offset = {}, 0
        for t in self.shards[k]:
            header[t.name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def while_waiting(self, work) -> None:
        """`work()` is called, instead of sleeping, whenever the producer waits for the disk; it
        returns True while it did something (streaming runs its deferred layer checks there)."""
        self._io.idle = work

    def write(self, name: str, tensor: torch.Tensor) -> None:
        k, t = self.order[self._pos]
        if name != t.name or tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype:
            raise RuntimeError(f"writer expected {t.name} {t.dtype}{list(t.shape)}, got {name} {tensor.dtype}{list(tensor.shape)}")
        if k != self._shard:
            if self._shard >= 0:
                self._io.close_file()
            self._shard = k
            self._io.open_file(self.folder / self.names[k], self._header(k))
        # the view keeps the tensor's storage alive until the background thread has written it;
        # an object with parts() (export_hf.Interleaved) is written part after part, without a copy
        for part in (tensor.parts() if hasattr(tensor, "parts") else (tensor,)):
            data = part.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._io.put(memoryview(data))
        self._pos += 1

    def finish(self) -> dict[str, dict]:
        if self._pos != len(self.order):
            raise RuntimeError(f"writer finished after {self._pos} of {len(self.order)} tensors")
        if self._shard >= 0:
            self._io.close_file()
        for path, digest in self._io.join():
            self.files[path.name] = {"bytes": path.stat().st_size, "sha256": digest}
        if len(self.names) > 1:
            weight_map = {t.name: self.names[k] for k, t in self.order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2))
        return self.files

    def abort(self) -> None:
        self._io.abort()


SYNC_EVERY_BYTES = 256 << 20


class PhaseSeconds:
    """Seconds summed per named phase (the streaming profile's accumulator)."""

    @contextlib.contextmanager
    def phase(self, field: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, field, getattr(self, field) + time.perf_counter() - t0)

    def timed(self, field: str, fn, *args):
        with self.phase(field):
            return fn(*args)


class IOSeconds(PhaseSeconds):
    """Where the writer's time went: each field is summed over calls on its own thread, so they
    overlap one another and the producer's work."""

    def __init__(self) -> None:
        self.write = self.sha256 = self.fsync = 0.0  # background threads
        self.producer_wait = 0.0  # the producer asleep, waiting for the disk (idle work excluded)

    def to_dict(self) -> dict:
        return {"write_s": self.write, "sha256_s": self.sha256, "fsync_s": self.fsync,
                "producer_wait_s": self.producer_wait}


def _fsync_close(file) -> None:
    try:
        os.fsync(file.fileno())
    finally:
        file.close()


class _BackgroundIO:
    """One thread that appends buffers to the open file, one that hashes each buffer while it is
    written, one that syncs to disk: every SYNC_EVERY_BYTES (so the disk writes while the next
    layers are mapped, instead of the whole output waiting for the final fsync) and each finished
    file. An error there is raised by the producer's next call."""

    def __init__(self, max_pending_bytes: int, seconds: IOSeconds):
        import queue
        import threading

        self._queue: "queue.Queue" = queue.Queue()
        self._cond = threading.Condition()
        self._pending = 0
        self._max_pending = max_pending_bytes
        self._error: BaseException | None = None
        self._done: list[tuple[Path, str]] = []
        from concurrent.futures import ThreadPoolExecutor

        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="upcycle-shard-hash")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="upcycle-shard-fsync")
        self._synced: list = []
        self._thread = threading.Thread(target=self._run, name="upcycle-shard-writer", daemon=True)
        self._thread.start()
        self.idle = None  # producer-side work to do while waiting (ShardWriter.while_waiting)
        self.seconds = seconds

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def open_file(self, path: Path, header: bytes) -> None:
        self._check()
        self._queue.put(("open", path, header))

    def _wait(self, ready) -> None:
        """Until ready(): the idle work first (it runs while the writer thread has data), then sleep."""
        while True:
            with self._cond:
                if ready():
                    return
            if self.idle is None or not self.idle():
                break
        with self.seconds.phase("producer_wait"), self._cond:
            self._cond.wait_for(ready)

    def put(self, data: memoryview) -> None:
        def room() -> bool:  # the disk has caught up (one buffer may always be pending)
            return self._pending == 0 or self._pending + data.nbytes <= self._max_pending or self._error is not None

        self._wait(room)
        with self._cond:
            self._pending += data.nbytes
        self._check()
        self._queue.put(("data", data))
        if data.nbytes > self._max_pending:  # a large tensor (an embedding) is written before the
            # next layer is built, so the two are not alive together
            self._wait(lambda: self._pending == 0 or self._error is not None)
            self._check()

    def close_file(self) -> None:
        self._check()
        self._queue.put(("close",))

    def join(self) -> list[tuple[Path, str]]:
        self._queue.put(("stop",))
        self._thread.join()
        self._check()
        for f in self._synced:
            f.result()
        return self._done

    def abort(self) -> None:
        self._queue.put(("abort",))
        self._thread.join()

    def _run(self) -> None:
        file, digest, path, unsynced = None, None, None, 0
        while True:
            item = self._queue.get()
            kind = item[0]
            if kind in ("stop", "abort"):
                if file is not None:
                    try:  # closing flushes: a full disk can fail here too
                        file.close()
                    except OSError as e:
                        if self._error is None and kind == "stop":
                            self._error = e
                self._hasher.shutdown()
                self._syncer.shutdown()
                return
            if self._error is not None:  # drain after a failure; release waiting producers
                if kind == "data":
                    self._release(item[1].nbytes)
                continue
            try:
                if kind == "open":
                    _, path, header = item
                    file, digest = open(path, "wb"), hashlib.sha256()
                    file.write(header)
                    digest.update(header)
                    unsynced = 0
                elif kind == "data":
                    try:  # hash on a second thread while this one writes the same buffer
                        hashed = self._hasher.submit(self.seconds.timed, "sha256", digest.update, item[1])
                        self.seconds.timed("write", self._write, file, item[1])
                        hashed.result()
                        unsynced += item[1].nbytes
                        if unsynced >= SYNC_EVERY_BYTES:  # keep the disk busy now, not all at the final fsync
                            file.flush()
                            self._synced.append(self._syncer.submit(self.seconds.timed, "fsync", os.fdatasync,
                                                                    file.fileno()))
                            unsynced = 0
                    finally:
                        self._release(item[1].nbytes)
                elif kind == "close":  # fsync on a third thread: the next shard's writes go on meanwhile
                    file.flush()
                    self._synced.append(self._syncer.submit(self.seconds.timed, "fsync", _fsync_close, file))
                    file = None
                    self._done.append((path, digest.hexdigest()))
            except BaseException as e:  # noqa: BLE001 - re-raised on the producer's thread
                self._error = e
                with self._cond:
                    self._cond.notify_all()

    @staticmethod
    def _write(file, data: memoryview) -> None:
        file.write(data)

    def _release(self, nbytes: int) -> None:
        with self._cond:
            self._pending -= nbytes
            self._cond.notify_all()
