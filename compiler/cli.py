"""`upcycle-compile SPEC MODEL -o OUT`: the command-line face of compile_upcycle.

User mistakes (bad spec, unreadable model, existing output) print one line and exit 2; a bug
prints one line too, unless --debug asks for the traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from pathlib import Path

import torch

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


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
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--print-schema", action="store_true", help="print the spec's JSON Schema (for editors) and exit")
    return p


def _fail(message: str, code: int) -> int:
    print(f"upcycle-compile: error: {message}", file=sys.stderr)
    return code


OUT_DTYPES = {"source": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bars(args) -> bool:
    """Progress bars only on a terminal: in logs their carriage returns are noise."""
    return not args.no_progress and sys.stderr.isatty()


def cast_output(model, dtype) -> None:
    """The upcycled model in `dtype` (routers stay fp32: router.py), its config saying so."""
    model.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype


def run(argv: list[str] | None = None) -> int:
    import dataclasses

    from upcycle.specs import load_spec
    from upcycle.specs.errors import SpecWarning

    from .errors import UpcycleError
    from .loading import load_model
    from .pipeline import analyse, upcycle_model
    from .plan import render_plan
    from .saving import save

    parser = build_parser()
    args = parser.parse_args(argv)
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
    if args.output and Path(args.output).exists() and not args.force and not args.dry_run:
        return _fail(f"{args.output}: output already exists; choose another path or pass --force", EXIT_USER_ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SpecWarning)
            spec = load_spec(args.spec)
        for w in caught:
            print(f"upcycle-compile: warning: {w.message}", file=sys.stderr)
        if args.no_verify or args.probe_tokens:
            verify = spec.verify
            if args.no_verify:
                verify = dataclasses.replace(verify, enabled=False)
            if args.probe_tokens:
                if args.probe_tokens < 1:
                    return _fail("--probe-tokens must be >= 1", EXIT_USER_ERROR)
                verify = dataclasses.replace(verify, probe_tokens=args.probe_tokens)
            spec = dataclasses.replace(spec, verify=verify)
        from .streaming import plan_on_meta, safetensors_input, stream_upcycle

        if args.target and args.format == "native":
            return _fail(f"--target {args.target} is a transformers format; drop --format native", EXIT_USER_ERROR)
        fmt = args.format or ("hf" if args.target else "native")
        text = None
        if args.calibration and not args.dry_run:
            from .calibration import read_calibration

            text = read_calibration(args.calibration)
        # the fast path by default: stream every safetensors input (bounded memory, same output)
        streaming = args.stream or (not args.no_stream and safetensors_input(args.model))
        if streaming:
            if not Path(args.model).exists() or not safetensors_input(args.model):
                return _fail(f"{args.model}: --stream needs a safetensors checkpoint (a transformers directory or a "
                             ".safetensors file with config.json)", EXIT_USER_ERROR)
            if args.dry_run or args.explain:
                mp = plan_on_meta(spec, args.model, args.config)
                if args.explain:
                    print(explain(mp.discovery))
                print(render_plan(mp.plan, spec, explain=args.explain))
                if args.dry_run:
                    return 0
            shard = _parse_size(args.max_shard_size)
            common = dict(config=args.config, force=args.force, max_shard_bytes=shard, progress=_bars(args),
                          dtype=OUT_DTYPES[args.dtype], calibration=text, calibration_name=_calib_name(args))
            hf_error = None
            if fmt == "hf":
                from .export_hf import ExportError

                try:  # refused (no transformers MoE format) before anything is written
                    result = stream_upcycle(spec, args.model, args.output, fmt="hf", target=args.target, **common)
                    print(result.report.to_text())
                    print(f"wrote {result.out} (transformers format; streamed {result.input_bytes / 1e9:.2f} GB -> "
                          f"{result.output_bytes / 1e9:.2f} GB in {result.seconds:.1f} s)")
                    return 0
                except ExportError as exc:
                    hf_error = str(exc)
            result = stream_upcycle(spec, args.model, args.output, **common)
            print(result.report.to_text())
            print(f"wrote {result.out} (streamed {result.input_bytes / 1e9:.2f} GB -> {result.output_bytes / 1e9:.2f} GB "
                  f"in {result.seconds:.1f} s)")
            if hf_error:
                return _fail(f"--format hf: {hf_error}; wrote the native format to {result.out} instead", EXIT_USER_ERROR)
            return 0
        loaded = load_model(args.model, trust_pickle=args.trust_pickle, config=args.config)
        if args.dry_run or args.explain:
            discovery, _, plan = analyse(loaded.model, spec)
            if args.explain:
                print(explain(discovery))
            print(render_plan(plan, spec, explain=args.explain))
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
            result = upcycle_model(loaded.model, spec, example_inputs=_as_probe(example), progress=_bars(args), **calib)
        if OUT_DTYPES[args.dtype] is not None:  # after verification, which ran in the source dtype
            cast_output(result.model, OUT_DTYPES[args.dtype])
        for w in caught:
            if issubclass(w.category, (UserWarning,)) and "upcycle" in str(w.filename):
                print(f"upcycle-compile: warning: {w.message}", file=sys.stderr)
        print(result.report.to_text())
        hf_error = None
        if fmt == "hf":
            from .export_hf import ExportError, export_hf

            try:
                out = export_hf(result.model, args.output, spec=spec, report=result.report, force=args.force,
                                files=loaded.extra_files or {}, target=args.target)
                print(f"wrote {out} (transformers format)")
                return 0
            except ExportError as exc:  # no transformers MoE counterpart: keep the work, in the native format
                hf_error = str(exc)
        out = save(result.model, args.output, spec=spec, report=result.report, source=loaded, force=args.force,
                   records=result.records)
        print(f"wrote {out}")
        if hf_error:
            return _fail(f"--format hf: {hf_error}; wrote the native format to {out} instead", EXIT_USER_ERROR)
        return 0
    except UpcycleError as exc:
        if args.debug:
            raise
        return _fail(str(exc), EXIT_USER_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted; no output was written", 130)
    except OSError as exc:  # disk full, permissions, I/O errors: the user's environment, not a bug
        if args.debug:
            raise
        where = exc.filename or args.output or args.model
        return _fail(f"{where}: {exc.strerror or exc}; no output was written (free space or choose another -o)"
                     if exc.errno == errno.ENOSPC else f"{where}: {exc.strerror or exc}; no output was written",
                     EXIT_USER_ERROR)
    except Exception as exc:  # a bug: one line unless --debug
        if args.debug:
            raise
        return _fail(f"internal error ({type(exc).__name__}: {exc}); re-run with --debug for the traceback", EXIT_INTERNAL_ERROR)


def _calib_name(args) -> str:
    return Path(args.calibration).name if args.calibration else "text"


def _parse_size(text: str) -> int:
    from .errors import UpcycleError

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise UpcycleError(f"--max-shard-size {text!r}: expected a size like 2GB, 500MB or 1GiB") from None
    if value < 1:
        raise UpcycleError(f"--max-shard-size {text!r}: must be positive")
    return value


def _as_probe(example):
    if example is None:
        return None
    args, kwargs = example
    return kwargs if not args else args


def explain(discovery) -> str:
    """The analysis passes (upcycle.passes.manager), their timings and decisions per block, and the MLPs."""
    return discovery.explain()


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
