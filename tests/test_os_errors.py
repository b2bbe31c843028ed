"""Every OS error is the user's environment: one line naming the path and the cause, exit 2, nothing left
behind, in every output mode (native, --stream, --format hf, both streamed, upcycle.save,
save_pretrained, upcycle-export-run); and Ctrl-C at any moment: exit 130, no partial output, no
temp folder, an earlier output untouched.

Real failures where the machine can make them without privileges (a missing parent, a parent that
is a file, EFBIG from `ulimit -f` on every writer including safetensors' Rust one, EMFILE from
`ulimit -n`, real SIGINT / SIGTERM); the rest (ENOSPC, EACCES, EROFS, EDQUOT, EIO, EMFILE on write)
are raised where the bytes are written, by the same call a real disk would fail in.
"""

import errno
import os
import resource
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _hostile import check_refusal, cli, entries, llama_config, llama_dir, snapshot, write_run_folder  # noqa: E402

import upcycle  # noqa: E402
from upcycle.compiler import atomic, checkpoint, saving  # noqa: E402
from upcycle.compiler.cli import run  # noqa: E402
from upcycle.compiler.os_errors import OutputError  # noqa: E402

MODES = {"native": [], "stream": ["--stream"], "hf": ["--format", "hf"], "stream-hf": ["--stream", "--format", "hf"]}
CAUSES = {errno.ENOSPC: ("No space left on device", "free space"), errno.EACCES: ("Permission denied", "no permission"),
          errno.EROFS: ("Read-only file system", "read-only"), errno.EDQUOT: ("Disk quota exceeded", "quota"),
          errno.EIO: ("Input/output error", "I/O error"), errno.EMFILE: ("Too many open files", "ulimit -n"),
          errno.EFBIG: ("File too large", "ulimit -f")}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("m") / "llama")


def _refused(capsys, out, args, needle, prog="upcycle-compile", code=2, main=None):
    before = entries(out.parent)
    capsys.readouterr()
    rc = (main or run)([*args, "-o", str(out)] + (["--no-progress"] if main is None else []))
    return check_refusal(rc, capsys.readouterr().err, needle=needle, out=out, parent_before=before, prog=prog,
                         code=code)


def _fail_writes(monkeypatch, code, after=0):
    """Make the output's bytes fail with `code` where each writer writes them: safetensors' own writer
    (native save, transformers' save_pretrained) and the shard writer's thread (--stream, --format hf)."""
    from safetensors import SafetensorError

    calls = {"n": 0}
    real_write = checkpoint._BackgroundIO._write

    def shard_write(file, data):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(code, os.strerror(code), file.name)
        real_write(file, data)

    def st_write(*a, **k):  # how safetensors reports it: text with "(os error N)", no errno
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    import transformers.modeling_utils as mu

    monkeypatch.setattr(checkpoint._BackgroundIO, "_write", staticmethod(shard_write))
    monkeypatch.setattr(saving, "st_save_model", st_write)
    monkeypatch.setattr(mu, "safe_save_file", st_write)


# ---- errors while writing, in every mode -----------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_full_disk_in_every_cli_mode(model, tmp_path, capsys, monkeypatch, mode):
    _fail_writes(monkeypatch, errno.ENOSPC, after=2)
    out = tmp_path / "a" / "b" / "out"  # missing parents: created for the run, removed with it
    line = _refused(capsys, out, ["e8g1t2", str(model), *MODES[mode]], "No space left on device")
    assert str(out) in line and "free space" in line and "internal error" not in line
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("code", sorted(CAUSES))
def test_each_cause_has_its_line(model, tmp_path, capsys, monkeypatch, code):
    _fail_writes(monkeypatch, code)
    mode = list(MODES.values())[code % 4]
    cause, hint = CAUSES[code]
    line = _refused(capsys, tmp_path / "out", ["e8g1t2", str(model), *mode], cause)
    assert hint in line and str(tmp_path / "out") in line


def _moe():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return upcycle.compile_upcycle(LlamaForCausalLM(llama_config()).eval(), "e8g1t2")


@pytest.mark.parametrize("writer", ["save", "export_hf", "save_pretrained"])
def test_python_writers_raise_one_output_error(tmp_path, monkeypatch, writer):
    from upcycle.compiler.export_hf import export_hf

    moe = _moe()
    write = {"save": lambda o: upcycle.save(moe, o, spec="e8g1t2"), "export_hf": lambda o: export_hf(moe, o, spec="e8g1t2"),
             "save_pretrained": lambda o: moe.save_pretrained(o)}[writer]
    _fail_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(OutputError) as info:
        write(tmp_path / "out")
    assert isinstance(info.value, upcycle.UpcycleError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC and len(str(info.value).splitlines()) == 1
    assert str(tmp_path / "out") in str(info.value)
    assert entries(tmp_path) == set()


def test_save_pretrained_into_a_trainer_folder_leaves_it_as_it_was(tmp_path, monkeypatch):
    """A Trainer checkpoint folder already holds other files; a failed save must not touch them."""
    moe = _moe()
    folder = tmp_path / "checkpoint-4"
    moe.save_pretrained(folder)
    (folder / "optimizer.pt").write_bytes(b"state")
    before = snapshot(folder)
    _fail_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(OutputError, match="the folder is unchanged"):
        moe.save_pretrained(folder)
    assert snapshot(folder) == before and entries(tmp_path) == {"checkpoint-4"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config()
    moe = upcycle.compile_upcycle(LlamaForCausalLM(cfg).eval(), "e8g1t2")
    from upcycle.specs import load_spec

    return write_run_folder(tmp_path_factory.mktemp("r") / "run", moe, load_spec("e8g1t2").to_dict(), cfg)


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_export_run_full_disk(run_dir, tmp_path, capsys, monkeypatch, fmt):
    from upcycle.compiler.export_run import main

    before = snapshot(run_dir)
    _fail_writes(monkeypatch, errno.ENOSPC)
    _refused(capsys, tmp_path / "out", [str(run_dir), "--format", fmt], "No space left on device",
             prog="upcycle-export-run", main=main)
    assert snapshot(run_dir) == before


# ---- the output's location, checked before any work ----------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_parent_is_a_file(model, tmp_path, capsys, mode):
    (tmp_path / "file").write_text("x")
    line = _refused(capsys, tmp_path / "file" / "sub" / "out", ["e8g1t2", str(model), *MODES[mode]],
                    "is a file, not a folder")
    assert str(tmp_path / "file") in line


def test_unwritable_location_refused_before_loading(model, tmp_path, capsys, monkeypatch):
    """EACCES / EROFS where the output goes: refused before the model is read (no minutes lost)."""
    from upcycle.compiler import loading

    loads = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(a))
    real_mkdir = os.mkdir
    (tmp_path / "ro").mkdir()
    for code in (errno.EACCES, errno.EROFS):
        def mkdir(path, *a, _code=code, **k):
            if str(path).startswith(str(tmp_path / "ro")):
                raise OSError(_code, os.strerror(_code), str(path))
            return real_mkdir(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
        _refused(capsys, tmp_path / "ro" / "out", ["e8g1t2", str(model)], CAUSES[code][0])
    assert loads == []


def test_missing_parents_are_created_and_kept_on_success(model, tmp_path):
    out = tmp_path / "x" / "y" / "out"
    assert run(["e8g1t2", str(model), "-o", str(out), "--no-progress"]) == 0
    assert (out / "upcycle.json").is_file() and entries(out.parent) == {"out"}


@pytest.mark.slow
def test_real_file_size_limit_every_mode(model, tmp_path, run_dir):
    """ulimit -f 64 KB: each writer's own write fails with EFBIG (safetensors' Rust writer included),
    in a child process; SIGXFSZ ignored, as a shell with `ulimit -f` set would have it."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))

    for name, flags in MODES.items():
        out = tmp_path / name
        r = cli(["e8g1t2", model, "-o", out, "--no-progress", "--force-resources", *flags], preexec_fn=limit)
        check_refusal(r.returncode, r.stderr, needle="File too large", out=out)
    out = tmp_path / "preflight"  # without --force-resources the pre-flight sees the limit first
    r = cli(["e8g1t2", model, "-o", out, "--stream", "--no-progress"], preexec_fn=limit)
    check_refusal(r.returncode, r.stderr, needle="ulimit -f", out=out)
    out = tmp_path / "export"
    r = cli([run_dir, "-o", out], module="upcycle.compiler.export_run", preexec_fn=limit)
    check_refusal(r.returncode, r.stderr, needle="File too large", out=out, prog="upcycle-export-run")
    assert entries(tmp_path) == set()


def test_real_too_many_open_files(model, tmp_path, capsys):
    """ulimit -n at the lowest free descriptor: the run's first open fails with a real EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    run(["e8g1t2", str(model), "--dry-run"])  # everything imported first
    capsys.readouterr()
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        rc = run(["e8g1t2", str(model), "-o", str(tmp_path / "out"), "--no-progress"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    check_refusal(rc, capsys.readouterr().err, needle="Too many open files", out=tmp_path / "out")
    assert entries(tmp_path) == set()


# ---- Ctrl-C at any moment ------------------------------------------------------------------------

def _interrupt_in(monkeypatch, owner, name, nth=1):
    """A real SIGINT to this process from inside `owner.name` on its nth call (then the call goes on)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, wrapper if not isinstance(real, staticmethod) else staticmethod(wrapper))


def _phases():
    from upcycle.compiler import loading, pipeline, streaming

    return {
        "loading": (["--no-stream"], lambda: (loading, "load_model", 1)),
        "mapping": ([], lambda: (pipeline, "moe_from_dense", 2)),
        "writing": (["--no-stream"], lambda: (saving, "st_save_model", 1)),
        "stream-reading": (["--stream"], lambda: (checkpoint.TensorReader, "get", 3)),
        "stream-writing": (["--stream", "--max-shard-size", "20KB"], lambda: (checkpoint.ShardWriter, "write", 7)),
        "hf-writing": (["--format", "hf"], lambda: (checkpoint.ShardWriter, "write", 4)),
        "stream-hf-mapping": (["--stream", "--format", "hf"], lambda: (streaming.MoEBuilder, "moe_for", 2)),
        "manifest": (["--no-stream"], lambda: (saving, "write_metadata", 1)),
        "rename": ([], lambda: (atomic, "_replace", 1)),
    }


@pytest.mark.parametrize("phase", list(_phases()))
def test_interrupt_at_each_phase(model, tmp_path, capsys, monkeypatch, phase):
    flags, where = _phases()[phase]
    out = tmp_path / "out"
    assert run(["e8g1t2", str(model), "-o", str(out), "--no-progress"]) == 0  # an earlier output, to be kept
    earlier = snapshot(out)
    before = entries(tmp_path)
    _interrupt_in(monkeypatch, *where())
    capsys.readouterr()
    rc = run(["e8g1t2-topk-then-softmax", str(model), "-o", str(out), "--no-progress", "--force", *flags])
    line = check_refusal(rc, capsys.readouterr().err, code=130, needle="interrupted")
    assert "no output was written" in line
    assert snapshot(out) == earlier and entries(tmp_path) == before  # the earlier output, no temp folder


def test_interrupt_in_save_pretrained_and_export_run(run_dir, tmp_path, capsys, monkeypatch):
    from upcycle.compiler import output_folder
    from upcycle.compiler.export_run import main

    moe = _moe()
    _interrupt_in(monkeypatch, output_folder, "finish_folder")
    with pytest.raises(KeyboardInterrupt):
        moe.save_pretrained(tmp_path / "pre")
    assert entries(tmp_path) == set()
    import upcycle.runtime.train_checkpoint as tc

    _interrupt_in(monkeypatch, tc, "check_checkpoint")
    _refused(capsys, tmp_path / "out", [str(run_dir)], "interrupted", prog="upcycle-export-run", code=130, main=main)


@pytest.fixture(scope="module")
def bigger_model(tmp_path_factory):
    """Big enough that a conversion takes a few seconds here (so a signal can land in the middle)."""
    return llama_dir(tmp_path_factory.mktemp("big") / "llama", hidden_size=256, intermediate_size=1024,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def _importing_torch(pid) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _signal_when(proc, sig, *, after=None, folder=None, torch_loading=False, timeout=600):
    """Send `sig` `after` seconds after the child began loading torch (in the middle of the work,
    however long a cold start takes), once a temp folder appears in `folder`, or once the child
    has begun loading torch (its start-up, inside upcycle's code: the interpreter's own first
    milliseconds, before any of our code runs, are Python's)."""
    t0, loading = time.monotonic(), None
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if loading is None and _importing_torch(proc.pid):
            loading = time.monotonic()
        if (after is not None and loading is not None and time.monotonic() - loading >= after) or \
                (torch_loading and loading is not None) or \
                (folder is not None and any(".tmp-" in n for n in entries(folder))):
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    return proc.communicate(timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start-up", "mid-work", "writing", "sigterm"])
def test_real_signal_from_outside(bigger_model, tmp_path, when):
    import subprocess

    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "upcycle.compiler.cli", "e8g8t8", str(bigger_model), "-o", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sig = signal.SIGTERM if when == "sigterm" else signal.SIGINT
    kw = {"start-up": dict(torch_loading=True), "mid-work": dict(after=2.0), "writing": dict(folder=tmp_path),
          "sigterm": dict(after=2.0)}[when]
    _, err = _signal_when(proc, sig, **kw)
    if proc.returncode == 0:  # finished before the signal landed: then the output is complete
        assert (out / "upcycle.json").is_file() and when != "start-up"
        pytest.skip(f"the conversion finished before the signal ({when}); output complete")
    check_refusal(proc.returncode, err, code=143 if sig == signal.SIGTERM else 130,
                  needle="terminated" if sig == signal.SIGTERM else "interrupted", out=out)
    assert entries(tmp_path) == set()


def test_cli_exit_is_not_aborted_by_threads_still_in_torch():
    """A CLI ends through failures.end_process: interpreter shutdown, with a thread still inside a
    torch op (as the shard writer's or torch's own can be after an interruption), aborts the process
    with 'terminate called without an active exception' (exit -6) after the run reported; the CLI's
    exit must be its own code whatever other threads are doing."""
    import subprocess

    code = ("import threading, time, torch\n"
            "from upcycle.compiler.failures import run_as_process\n"
            "def spin():\n"
            "    a = torch.randn(256, 256)\n"
            "    while True:\n"
            "        torch.mm(a, a)\n"
            "def body():\n"
            "    for _ in range(2):\n"
            "        threading.Thread(target=spin, daemon=True).start()\n"
            "    time.sleep(0.3)\n"
            "    return 7\n"
            "run_as_process('x', body)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 7, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "terminate called" not in proc.stderr


@pytest.mark.slow
def test_signal_after_the_output_is_in_place_keeps_the_run_successful(model, tmp_path):
    """SIGTERM landing after the rename, while the CLI prints its last line: the output is complete,
    so the run must end 0 with it (not 'no output was written' beside a complete folder). The
    signal is sent by the process itself at its 'wrote' line, so the moment is exact."""
    import subprocess

    out = tmp_path / "out"
    code = ("import os, signal, sys, time\n"
            "real = sys.stdout.write\n"
            "def write(text):\n"
            "    if text.startswith('wrote '):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(0.2)\n"
            "    return real(text)\n"
            "sys.stdout.write = write\n"
            f"sys.argv = ['upcycle-compile', 'e8g8t8', {str(model)!r}, '-o', {str(out)!r}, '--no-progress']\n"
            "from upcycle.compiler.cli import main\n"
            "main()\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert f"wrote {out}" in proc.stdout and (out / "upcycle.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("module", ["upcycle.compiler.cli"])
def test_cli_modules_start_without_torch(module):
    """The CLIs install their Ctrl-C / SIGTERM handling before torch loads (seconds on a cold
    cache): importing their module must not pull torch in through a package __init__."""
    import subprocess

    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] or f"{module} imports torch at start-up"
