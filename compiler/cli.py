"""`upcycle-compile SPEC MODEL -o OUT`: the command-line face of compile_upcycle.

User mistakes and the environment (bad spec, unreadable model, existing output, too little memory
or disk, a full disk half-way) print one line and exit 2; Ctrl-C exits 130 leaving nothing
behind; a bug prints one line too (exit 1), unless --debug asks for the traceback
(compiler/failures.py). Before any work: the output location is checked (atomic.probe_writable),
and the plan's memory and disk needs against what is available (preflight.py).

torch is imported inside `run`, not at import time, so that even an interruption while it loads
ends with one line and exit 130.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .failures import EXIT_USER_ERROR, fail, report, run_as_process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upcycle-compile",
        description="Upcycle a dense transformer into a Mixture-of-Experts model from a YAML spec.",
    )
    p.add_argument("spec", nargs="?", help="spec YAML file, or a preset name (e8g8t8, e8g1t2, e8g1t2-topk-then-softmax, ...)")
    p.add_argument("model", nargs="?", help="transformers model directory (sharded or not), a .safetensors or .pt state dict with "
                   "config.json beside it (or --config), a .gguf file, a torch.export program (.pt2), or a pickled "
                   "module (needs --trust-pickle)")
    p.add_argument("-o", "--output", help="output folder (weights, resolved spec, report, manifest)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; nothing is rewritten or written")
    p.add_argument("--explain", action="store_true", help="print the traced units and each pass's decisions")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole-module .pt (runs code from the file)")
    p.add_argument("--no-verify", action="store_true", help="skip the dense-vs-MoE probe check")
    p.add_argument("--probe-tokens", type=int, default=None, help="tokens in the verification probe batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (bars are drawn only on a terminal)")
    p.add_argument("--dtype", choices=["source", "bf16", "fp16", "fp32"], default="source",
                   help="dtype of the written weights (default: the source checkpoint's); the mapping runs in fp32 "
                        "or the source dtype and is cast on write; native outputs keep routers in fp32")
    p.add_argument("--config", help="config.json (or its folder) for a bare .safetensors / .pt state dict")
    stream = p.add_mutually_exclusive_group()
    stream.add_argument("--stream", action="store_true",
                        help="stream a safetensors checkpoint tensor by tensor (bounded memory; per-layer verification, "
                        "whole-model with --calibration); the default for every safetensors input")
    stream.add_argument("--no-stream", action="store_true",
                        help="load the whole model in memory (whole-model check on a random probe without --calibration)")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard (e.g. 2GB, 500MB)")
    from .targets import TARGETS

    formats = "; ".join(f"{t.name} ({', '.join(t.sources)})" for t in TARGETS.values())
    p.add_argument("--format", choices=("native", "hf"), default=None,
                   help="output format: native (upcycle folder, any architecture; the default) or hf (a transformers "
                        "MoE checkpoint that loads without custom code; the exact format for the source family)")
    p.add_argument("--target", choices=list(TARGETS), metavar="NAME",
                   help=f"the transformers MoE format (implies --format hf): {formats}; default: the first "
                        "that holds the model exactly")
    p.add_argument("--calibration", metavar="FILE",
                   help="plain-text file, tokenized with the model's own tokenizer: the probe for per-layer "
                        "verification and k-means router init, and the perplexity before/after in the report "
                        "(--probe-tokens tokens of it, default 256)")
    p.add_argument("--force-resources", action="store_true",
                   help="go ahead even if the pre-flight estimate of memory or disk space says it will not fit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--print-schema", action="store_true", help="print the spec's JSON Schema (for editors) and exit")
    return p


PROG = "upcycle-compile"


def _fail(message: str, code: int) -> int:
    return fail(PROG, message, code)


def out_dtypes() -> dict:
    import torch

    return {"source": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bars(args) -> bool:
    """Progress bars only on a terminal: in logs their carriage returns are noise."""
    return not args.no_progress and sys.stderr.isatty()


def cast_output(model, dtype) -> None:
    """The upcycled model in `dtype` (routers stay fp32: router.py), its config saying so."""
    model.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype


def run(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit code. Every failure, Ctrl-C included, ends in one line (failures.report)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (Exception, KeyboardInterrupt) as exc:
        return report(PROG, exc, debug=args.debug)


def _run(args) -> int:
    import dataclasses

    from upcycle.specs import load_spec
    from upcycle.specs.errors import SpecWarning

    from . import resources
    from .loading import load_model
    from .pipeline import analyse, upcycle_model
    from .plan import render_plan
    from .saving import save
    from .streaming import plan_on_meta, safetensors_input, stream_upcycle

    if args.print_schema:
        from upcycle.specs.json_schema import dumps

        print(dumps())
        return 0
    if args.spec is None or args.model is None:
        return _fail("give a SPEC (file or preset) and a MODEL (see --help)", EXIT_USER_ERROR)
    if not _bars(args):  # transformers' own loading bars too
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    if not args.dry_run and not args.output:
        return _fail("give an output folder with -o OUT (or use --dry-run to only see the plan)", EXIT_USER_ERROR)
    if args.output and not args.dry_run:  # the output's location, before any work
        from .atomic import check_output_location

        check_output_location(args.output, args.force, [args.model, args.config])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecWarning)
        spec = load_spec(args.spec)
    for w in caught:
        print(f"upcycle-compile: warning: {w.message}", file=sys.stderr)
    if args.no_verify or args.probe_tokens is not None:
        verify = spec.verify
        if args.no_verify:
            verify = dataclasses.replace(verify, enabled=False)
        if args.probe_tokens is not None:
            if args.probe_tokens < 1:
                return _fail("--probe-tokens must be >= 1", EXIT_USER_ERROR)
            verify = dataclasses.replace(verify, probe_tokens=args.probe_tokens)
        spec = dataclasses.replace(spec, verify=verify)
    dtypes = out_dtypes()
    shard = resources.parse_size(args.max_shard_size, "--max-shard-size")
    if args.target and args.format == "native":
        return _fail(f"--target {args.target} is a transformers format; drop --format native", EXIT_USER_ERROR)
    fmt = args.format or ("hf" if args.target else "native")
    text = None
    if args.calibration and not args.dry_run:
        from .calibration import read_calibration

        text = read_calibration(args.calibration)
    is_safetensors = safetensors_input(args.model)
    # the fast path by default: stream every safetensors input (bounded memory, same output)
    streaming = args.stream or (not args.no_stream and is_safetensors)
    if streaming:
        if not Path(args.model).exists() or not is_safetensors:
            return _fail(f"{args.model}: --stream needs a safetensors checkpoint (a transformers directory or a "
                         ".safetensors file with config.json)", EXIT_USER_ERROR)
        if args.dry_run or args.explain:
            mp = plan_on_meta(spec, args.model, args.config)
            if args.explain:
                print(explain(mp.discovery))
            print(render_plan(mp.plan, spec, explain=args.explain))
            size = next(iter(mp.model.parameters())).element_size()
            w = resources.workload(mp.plan, spec, mp.model, itemsize=size, out_itemsize=_itemsize(dtypes[args.dtype], size))
            print(resources.describe(resources.streaming(w), args.output))
            if args.dry_run:
                return 0
        common = dict(config=args.config, force=args.force, max_shard_bytes=shard, progress=_bars(args),
                      dtype=dtypes[args.dtype], force_resources=args.force_resources, calibration=text,
                      calibration_name=_calib_name(args))

        def streamed(**kw):
            result = stream_upcycle(spec, args.model, args.output, **common, **kw)
            print(result.report.to_text())
            fmt_note = "transformers format; " if kw else ""
            print(f"wrote {result.out} ({fmt_note}streamed {result.input_bytes / 1e9:.2f} GB -> "
                  f"{result.output_bytes / 1e9:.2f} GB in {result.seconds:.1f} s)")
            return result.out

        return _write(fmt, lambda: streamed(fmt="hf", target=args.target), streamed)
    if is_safetensors and Path(args.model).exists() and not args.explain:
        # planned on the meta device from the config: an impossible job is refused before loading
        from .preflight import check_in_memory, plan_checkpoint

        pre = plan_checkpoint(spec, args.model, args.config, out_dtype=dtypes[args.dtype])
        if args.dry_run:
            print(render_plan(pre.plan, spec))
            print(resources.describe(pre.in_memory, args.output))
            return 0
        if not args.force_resources:
            check_in_memory(pre, args.output)
    loaded = load_model(args.model, trust_pickle=args.trust_pickle, config=args.config)
    if args.dry_run or args.explain:
        discovery, _, plan = analyse(loaded.model, spec)
        if args.explain:
            print(explain(discovery))
        print(render_plan(plan, spec, explain=args.explain))
        p = next(iter(loaded.model.parameters()), None)
        if p is not None:
            w = resources.workload(plan, spec, loaded.model, itemsize=p.element_size(),
                                   out_itemsize=_itemsize(dtypes[args.dtype], p.element_size()))
            print(resources.describe(resources.in_memory(w, loaded=True), args.output))
        if args.dry_run:
            return 0
    example = loaded.example_inputs
    calib = {}
    if text is not None:
        from .calibration import load_tokenizer

        calib = dict(calibration=text, tokenizer=load_tokenizer(args.model, args.config),
                     calibration_name=_calib_name(args))
        example = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = upcycle_model(loaded.model, spec, example_inputs=_as_probe(example), progress=_bars(args),
                               force_resources=args.force_resources, **calib)
    if dtypes[args.dtype] is not None:  # after verification, which ran in the source dtype
        cast_output(result.model, dtypes[args.dtype])
    for w in caught:
        if issubclass(w.category, (UserWarning,)) and "upcycle" in str(w.filename):
            print(f"upcycle-compile: warning: {w.message}", file=sys.stderr)
    print(result.report.to_text())

    def hf():
        from .export_hf import export_hf

        out = export_hf(result.model, args.output, spec=spec, report=result.report, force=args.force,
                        files=loaded.extra_files or {}, target=args.target, force_resources=args.force_resources)
        print(f"wrote {out} (transformers format)")
        return out

    def native():
        out = save(result.model, args.output, spec=spec, report=result.report, source=loaded, force=args.force,
                   records=result.records, force_resources=args.force_resources)
        print(f"wrote {out}")
        return out

    return _write(fmt, hf, native)


def _write(fmt: str, hf, native) -> int:
    """Write the output (streamed or in memory alike): `hf()` for --format hf, and where no
    transformers MoE format holds the model (ExportError, raised before anything is written) the
    work is kept: `native()` writes the native format, and the exit code says hf was refused."""
    if fmt == "hf":
        from .export_hf import ExportError

        try:
            hf()
            return 0
        except ExportError as exc:
            hf_error = str(exc)
    else:
        hf_error = None
    out = native()
    if hf_error:
        return _fail(f"--format hf: {hf_error}; wrote the native format to {out} instead", EXIT_USER_ERROR)
    return 0


def _calib_name(args) -> str:
    return Path(args.calibration).name if args.calibration else "text"


def _itemsize(dtype, default: int) -> int:
    from .resources import itemsize_of

    return itemsize_of(dtype) if dtype is not None else default


def _as_probe(example):
    if example is None:
        return None
    args, kwargs = example
    return kwargs if not args else args


def explain(discovery) -> str:
    """The analysis passes (upcycle.passes.manager), their timings and decisions per block, and the MLPs."""
    return discovery.explain()


def main() -> None:
    run_as_process(PROG, run)


if __name__ == "__main__":
    main()
