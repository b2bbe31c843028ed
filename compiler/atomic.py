"""An output folder appears complete or not at all: written in a temp folder beside it, renamed into place.

Why a module: every output mode (native, --stream, --format hf, upcycle.save, save_pretrained,
upcycle-export-run) must leave one of three states whatever happens half-way (a full disk, a
read-only or foreign folder, Ctrl-C): nothing, the previous output, or the complete new one. So:

- the output's location is checked before anything is written (a parent that is a file, no write
  permission, a read-only filesystem: one line, `OutputError`), and its free space against the
  planned bytes (`resources.check_disk`);
- `--force` replaces only an earlier output (a folder with upcycle.json or upcycle_export.json, or an
  empty one), never a folder of something else, a file, a symlink, or the input being converted;
- missing parent folders are created, and removed again if the run fails;
- the old output is moved aside before the new one is renamed into place and deleted after, and
  Ctrl-C is held back during that step and during clean-up, so no moment loses both;
- in a command-line run (`end_interrupts_at_commit`) an interrupt after the rename is ignored: the
  output is complete and the run only prints and exits, so it must not say nothing was written;
- an OS failure anywhere inside becomes an `OutputError` naming the output path and the cause.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import UpcycleError
from .os_errors import OutputError, describe, output_error
from .output_folder import OUTPUT_MARKERS  # what an earlier output of ours holds
from . import resources
from .resources import nearest_existing  # noqa: F401  (re-exported)


_interrupts_end_at_commit = False


def end_interrupts_at_commit() -> None:
    """For a process that ends once its output is in place (the CLIs, failures.run_as_process):
    from a commit on, Ctrl-C and SIGTERM are ignored, so one landing while the last line prints
    cannot turn a complete output into a reported failure. Library callers keep their interrupts."""
    global _interrupts_end_at_commit
    _interrupts_end_at_commit = True


class _Held(list):
    """The signals that arrived inside a held block; `committed` set by a block that passed its
    point of no return (the rename), after which an interruption can no longer undo it."""

    committed = False


@contextlib.contextmanager
def held_interrupts():
    """Ctrl-C (SIGINT) and SIGTERM wait until the block is done, then act (main thread only: signal
    handlers live there). Used around the few steps that must not stop half-way. Yields the list of
    signals that arrived, so a block can undo what it did before the interruption acts."""
    if threading.current_thread() is not threading.main_thread():
        yield _Held()
        return
    pending = _Held()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda s, f: pending.append(s))
        except (ValueError, OSError):  # not settable here (embedded interpreters)
            pass
    try:
        yield pending
    finally:
        if pending.committed and _interrupts_end_at_commit:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            return
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            sig = pending[0]
            handler = previous.get(sig)
            if callable(handler):
                handler(sig, None)  # Python's own SIGINT handler raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)  # as if it had arrived now


def is_inside(a: Path, b: Path) -> bool:
    """Whether path `a` is `b` or lies inside it (after resolving symlinks)."""
    try:
        a, b = a.resolve(), b.resolve()
    except (OSError, RuntimeError):
        return False
    return a == b or b in a.parents


def check_not_input(out: Path, inputs) -> None:
    """The output must not be, contain, or lie inside an input: --force would delete the input."""
    for src in inputs or ():
        if src is None:
            continue
        src = Path(src)
        if is_inside(out, src) or is_inside(src, out):
            raise UpcycleError(f"{out}: the output folder would overlap the input {src}; choose an -o outside it "
                               "(the input is never changed)")


def check_output(out, force: bool, inputs=()) -> None:
    """The one rule for where an output may go, applied by every output mode: not overlapping an
    input (`check_not_input`), and absent or, with force, an earlier output (`check_replaceable`).
    `atomic_output` applies it again when it starts writing."""
    out = Path(out)
    check_not_input(out, inputs)
    check_replaceable(out, force)


def check_output_location(out, force: bool, inputs=()) -> None:
    """The CLIs' check before any work: `check_output`, then a temp folder made and removed where
    the output will go (`probe_writable`), so a read-only or foreign location fails in seconds."""
    check_output(out, force, inputs)
    probe_writable(out)


def check_replaceable(out: Path, force: bool) -> None:
    """An existing `out` may be replaced only with force, and only if it is an earlier output."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise UpcycleError(f"{out}: output already exists; choose another path or pass --force (force=True) to replace it")
    if out.is_symlink() or not out.is_dir():
        kind = "a symlink" if out.is_symlink() else "a file"
        raise UpcycleError(f"{out}: is {kind}, not an earlier output folder; --force replaces only those: "
                           "remove it yourself or choose another -o")
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise OutputError(describe(exc, out, doing="looking into the folder to replace"), exc.errno, str(out)) from None
    if not empty and not any((out / m).is_file() for m in OUTPUT_MARKERS):
        raise UpcycleError(f"{out}: exists and is not an upcycle output (no {' or '.join(OUTPUT_MARKERS)}); --force "
                           "replaces only earlier outputs: remove it yourself or choose another -o")


def make_parents(folder: Path) -> list[Path]:
    """Create `folder` and missing ancestors; returns those created (deepest last), for clean-up.
    A part of the path that is a file, no permission, a read-only filesystem: OutputError."""
    folder = Path(os.path.abspath(folder))
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"{p}: is a file, not a folder, so {folder} cannot be created; choose another output folder (-o)",
                          20, str(p))  # ENOTDIR
    created = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except OSError as exc:
        remove_created(created)
        raise OutputError(describe(exc, exc.filename or folder, doing="creating the output's parent folder"),
                          exc.errno, str(folder)) from None
    return created


def remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            pass  # not empty (someone else wrote there) or already gone: leave it


def _make_temp(out: Path, kind: str = "tmp") -> tuple[Path, list[Path]]:
    """A temp folder beside `out`, parents created as needed: (the folder, the parents created)."""
    with held_interrupts():
        created = make_parents(out.parent)
        try:
            return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=out.parent)), created
        except OSError as exc:
            remove_created(created)
            raise OutputError(describe(exc, out.parent, doing="creating the output folder"), exc.errno, str(out)) from None


def _output_error_for(exc: BaseException, tmp: Path, out: Path, note: str) -> OutputError | None:
    """The OutputError to raise instead of `exc` (an OS failure inside the block), or None: re-raise."""
    if isinstance(exc, UpcycleError) or not isinstance(exc, Exception):
        return None
    return output_error(exc, _shown(getattr(exc, "filename", None) or "", tmp, out), note=note)


def probe_writable(out) -> None:
    """Fail now, not after the conversion, if the output cannot be written: creates and removes a
    temp folder where the output will go (parents included)."""
    tmp, created = _make_temp(Path(out), "probe")
    with held_interrupts():
        os.rmdir(tmp)
        remove_created(created)


def _shown(path: str, tmp: Path, out: Path) -> str:
    """A path inside the temp folder, as the user will know it (inside `out`)."""
    if path and str(path).startswith(str(tmp)):
        return str(out) + str(path)[len(str(tmp)):]
    return str(path) if path else str(out)


@contextlib.contextmanager
def atomic_output(out_dir, *, force: bool = False, need_bytes: int | None = None, force_resources: bool = False,
                  inputs=()):
    """Yield a temp folder beside `out_dir`, renamed onto it when the block finishes; removed (with
    any parent folders made for it) on any error or interruption, so `out_dir` is either absent,
    the previous output, or complete. need_bytes: what will be written, checked against the free
    space first (resources.check_disk; force_resources skips). inputs: paths the output must not
    overlap."""
    out = Path(out_dir)
    check_output(out, force, inputs)
    tmp, created = _make_temp(out)
    try:
        if need_bytes is not None and not force_resources:
            resources.check_disk(need_bytes, out)
        yield tmp
        for p in tmp.iterdir():  # mkdtemp and some writers use private modes; outputs are ordinary files
            if p.is_file():
                p.chmod(0o644)
        tmp.chmod(0o755)
        with held_interrupts() as interrupted:
            old = _replace(tmp, out)
            if interrupted:  # Ctrl-C while renaming: undo, so an interrupted run leaves the previous state
                os.replace(out, tmp)
                if old is not None:
                    os.replace(old / out.name, out)
            else:
                interrupted.committed = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        with held_interrupts():
            shutil.rmtree(tmp, ignore_errors=True)
            remove_created(created)
        err = _output_error_for(exc, tmp, out, "nothing was written")
        if err is None:
            raise
        raise err from None


def _replace(tmp: Path, out: Path) -> Path | None:
    """Rename `tmp` onto `out`; an earlier output is first moved aside into a folder that is
    returned (the caller deletes it, or puts it back)."""
    if not out.exists():
        os.replace(tmp, out)
        return None
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the previous output back
        shutil.rmtree(old, ignore_errors=True)
        raise
    return old


WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")  # what transformers' save_pretrained writes


@contextlib.contextmanager
def staged_into(folder):
    """Like atomic_output, for a folder that may already hold other files (a Trainer checkpoint:
    optimizer state, trainer_state.json): files are written into a temp folder beside it, then moved
    in one by one with interrupts held, the manifest last, and weight files of an earlier save that
    the new one does not have are removed (as transformers does). On failure `folder` is as it was."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(f"{folder}: is a file or a symlink, not a folder; choose another save_directory", 20, str(folder))
    tmp, created = _make_temp(folder)
    made_folder = False
    try:
        yield tmp
        with held_interrupts() as held:
            if not folder.exists():
                folder.mkdir()
                made_folder = True
            names = sorted(p.name for p in tmp.iterdir())
            names.sort(key=lambda n: n in OUTPUT_MARKERS)  # the manifest last: a folder is complete once it is there
            for name in names:
                if (tmp / name).is_file():
                    (tmp / name).chmod(0o644)
                os.replace(tmp / name, folder / name)
            for p in folder.iterdir():
                if p.name.startswith(WEIGHT_PREFIXES) and p.name not in names and p.is_file():
                    p.unlink()
            shutil.rmtree(tmp, ignore_errors=True)
            held.committed = True
    except BaseException as exc:
        with held_interrupts():
            shutil.rmtree(tmp, ignore_errors=True)
            if made_folder:
                shutil.rmtree(folder, ignore_errors=True)
            remove_created(created)
        err = _output_error_for(exc, tmp, folder, "the folder is unchanged")
        if err is None:
            raise
        raise err from None


__all__ = ["atomic_output", "staged_into", "held_interrupts", "end_interrupts_at_commit", "probe_writable", "check_output",
           "check_output_location", "check_replaceable", "check_not_input",
           "nearest_existing", "make_parents", "remove_created", "OUTPUT_MARKERS"]
