"""`upcycle-compile SPEC MODEL -o OUT`: the command-line face of compile_upcycle.

User mistakes (bad spec, unreadable model, existing output) print one line and exit 2; a bug
prints one line too, unless --debug asks for the traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upcycle-compile",
        description="Upcycle a dense transformer into a Mixture-of-Experts model from a YAML spec.",
    )
    p.add_argument("spec", help="spec YAML file, or a preset name (e8g8t8, e8g1t2, e8g1t2-topk-then-softmax, ...)")
    p.add_argument("model", help="transformers model directory, .gguf file, torch.export program (.pt/.pt2), or pickled module (needs --trust-pickle)")
    p.add_argument("-o", "--output", help="output folder (weights, resolved spec, report, manifest)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; nothing is rewritten or written")
    p.add_argument("--explain", action="store_true", help="print the traced units and each pass's decisions")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole-module .pt (runs code from the file)")
    p.add_argument("--no-verify", action="store_true", help="skip the dense-vs-MoE probe check")
    p.add_argument("--probe-tokens", type=int, default=None, help="tokens in the verification probe batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _fail(message: str, code: int) -> int:
    print(f"upcycle-compile: error: {message}", file=sys.stderr)
    return code


def run(argv: list[str] | None = None) -> int:
    import dataclasses

    from upcycle.specs import load_spec
    from upcycle.specs.errors import SpecWarning

    from .errors import UpcycleError
    from .loading import load_model
    from .pipeline import analyse, upcycle_model
    from .plan import render_plan
    from .saving import save

    args = build_parser().parse_args(argv)
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
        loaded = load_model(args.model, trust_pickle=args.trust_pickle)
        if args.dry_run or args.explain:
            discovery, _, plan = analyse(loaded.model, spec)
            if args.explain:
                print(explain(discovery))
            print(render_plan(plan, spec))
            if args.dry_run:
                return 0
        example = loaded.example_inputs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = upcycle_model(loaded.model, spec, example_inputs=_as_probe(example), progress=not args.no_progress)
        for w in caught:
            if issubclass(w.category, (UserWarning,)) and "upcycle" in str(w.filename):
                print(f"upcycle-compile: warning: {w.message}", file=sys.stderr)
        print(result.report.to_text())
        out = save(result.model, args.output, spec=spec, report=result.report, source=loaded, force=args.force)
        print(f"wrote {out}")
        return 0
    except UpcycleError as exc:
        if args.debug:
            raise
        return _fail(str(exc), EXIT_USER_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted; no output was written", 130)
    except Exception as exc:  # a bug: one line unless --debug
        if args.debug:
            raise
        return _fail(f"internal error ({type(exc).__name__}: {exc}); re-run with --debug for the traceback", EXIT_INTERNAL_ERROR)


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
