"""Helpers for the bad-input and safety suites: tiny inputs, folder snapshots, and the one check every
refusal must pass (exit code, one line, no traceback, nothing at -o, input unchanged, no marker)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def address_space_cap(headroom: int = 4 << 30):
    """If a pre-flight check ever let a huge job through, it must die of an allocation error in the
    test, not take the machine (and other people's processes) down with it: the address space is
    capped at what the process holds plus `headroom` while the block runs."""
    import resource

    used = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            used = int(line.split()[1]) * 1024
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def llama_dir(path: Path, seed: int = 0, **kw) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(**kw)).save_pretrained(path)
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def snapshot(path: Path) -> dict:
    """{relative path: (size, sha256, mode)} of everything under `path` (a file or a folder)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = {}
    for f in files:
        st = f.stat()
        out[str(f.relative_to(path)) if f != path else f.name] = (st.st_size, hashlib.sha256(f.read_bytes()).hexdigest(),
                                                                  st.st_mode)
    return out


def entries(folder: Path) -> set:
    return {p.name for p in Path(folder).iterdir()} if Path(folder).is_dir() else set()


def check_refusal(rc: int, err: str, *, needle: str | list = (), prog: str = "upcycle-compile", code: int = 2,
                  out: Path | None = None, parent_before: set | None = None) -> str:
    """The rules for a refused run: `code`, exactly one stderr line `PROG: error: ...` naming the
    problem, no traceback, nothing at `out` and no temp folder beside it."""
    err = err.strip()
    assert rc == code, f"exit {rc} (expected {code}): {err[-2000:]}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for n in ([needle] if isinstance(needle, str) else needle):
        assert n in err, f"{n!r} not in {err!r}"
    if out is not None:
        assert not Path(out).exists() and not Path(out).is_symlink(), f"{out} was left behind"
        if parent_before is not None:
            assert entries(Path(out).parent) == parent_before, entries(Path(out).parent) - parent_before
    return lines[0]


def cli(args, *, env: dict | None = None, module: str = "upcycle.compiler.cli", timeout: int = 1800, **kw):
    # (generous: on a machine shared with training jobs a fresh interpreter importing torch can take minutes)
    """upcycle-compile (or `module`) in a fresh process; the CompletedProcess."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
            **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full, cwd=ROOT, **kw)


def marker_payload(marker: Path) -> str:
    """Python source that, if it ever runs, proves code from the input ran."""
    return f"open({str(marker)!r}, 'w').write('ran')\n"


def write_run_folder(run: Path, model, spec: dict, config) -> Path:
    """A run folder as examples/train.py writes it (run.json + one DCP checkpoint), made directly."""
    import torch

    from upcycle.runtime.train_checkpoint import save_training_checkpoint

    run.mkdir(parents=True)
    dense = config.to_dict()
    (run / "run.json").write_text(json.dumps({"source": {"kind": "config"}, "dense_config": dense, "spec": spec}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_training_checkpoint(run / "checkpoints" / "step-000001", model, opt, step=1, data_position=0)
    return run
