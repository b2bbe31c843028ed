"""A training run's checkpoint -> an upcycle output folder or a transformers MoE checkpoint.

    upcycle-export-run RUN_DIR -o OUT [--format native|hf] [--step N] [--force]

The run folder written by the trainer (upcycle.runtime.training, examples/train.py) holds run.json (the dense model's config and the
resolved spec, or the upcycled folder it started from) and DCP checkpoints. The model is rebuilt
without weights of its own (the saved rewrite replayed on the dense config), the checkpoint's model
weights are loaded into it (DCP reshards: a checkpoint from any number of ranks), and the result is
written with `upcycle.save` or the transformers export. The optimizer state is not read.

The run folder is input like any other: run.json is read defensively (jsonfiles), the upcycled
folder it may start from is integrity-checked on load, the checkpoint's files are checked against
its checksums.json and its DCP metadata is unpickled only into DCP's own classes
(runtime.train_checkpoint.SafeReader). Failures are one line, exit 2 (Ctrl-C 130), as in
upcycle-compile (failures.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.nn as nn

from .errors import ModelError, UpcycleError, brief
from .failures import report, run_as_process
from .jsonfiles import read_json


def read_run_info(run_dir: Path) -> dict:
    """run.json of a run folder (its format: upcycle.runtime.training.run_dir), read defensively
    (jsonfiles) and checked for the keys the rebuild reads; one UpcycleError/ModelError otherwise."""
    from upcycle.runtime.training.run_dir import NoRunInfo, RunInfoError
    from upcycle.runtime.training.run_dir import read_run_info as read

    try:
        return read(run_dir, read_json=lambda path: read_json(path, what="run.json"))
    except NoRunInfo as exc:
        raise UpcycleError(str(exc)) from None
    except RunInfoError as exc:
        raise ModelError(str(exc)) from None


def rebuild_run_model(run_dir: Path, info: dict | None = None, *, force_resources: bool = False) -> tuple[nn.Module, dict]:
    """The run's upcycled model with its initial weights, and its resolved spec (the memory it
    needs checked first, on the meta device: preflight.check_rebuild)."""
    run_dir = Path(run_dir)
    info = info if info is not None else read_run_info(run_dir)
    source = info.get("source", {})
    if source.get("kind") == "upcycled":
        from upcycle.specs import load_spec

        from .output_folder import SPEC
        from .reload import load

        path = Path(source["path"])
        return load(path, force_resources=force_resources), load_spec(path / SPEC).to_dict()
    from transformers import AutoConfig

    from .loading import build_transformers_skeleton
    from .pipeline import upcycle_model

    cfg = {k: v for k, v in info["dense_config"].items() if k != "auto_map"}  # never remote code
    try:
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except Exception as exc:
        raise ModelError(f"{run_dir / 'run.json'}: dense_config is not a transformers config ({brief(exc)})") from None
    if not force_resources:
        from .preflight import check_rebuild

        check_rebuild(config, info["spec"])
    dense = build_transformers_skeleton(config)
    return upcycle_model(dense, info["spec"], structure_only=True).model, info["spec"]


def _load_weights(ckpt: Path, model: nn.Module) -> None:
    """The checkpoint's model weights into `model`; anything wrong with the checkpoint is one ModelError."""
    from upcycle.runtime.train_checkpoint import CheckpointError, load_model_weights

    from .os_errors import as_os_error, describe

    try:
        load_model_weights(ckpt, model)
    except CheckpointError as exc:
        raise ModelError(str(exc)) from None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # DCP wraps what went wrong (CheckpointException, AssertionError, RuntimeError)
        err = as_os_error(exc)
        if err is not None:
            raise ModelError(describe(err, err.filename or ckpt, doing="reading the checkpoint")) from None
        raise ModelError(f"{ckpt}: cannot load the model weights from this checkpoint ({brief(exc, 300)}); "
                         "is it from this run?") from None


def _relaxed(spec: dict) -> dict:
    spec = json.loads(json.dumps(spec))
    spec.setdefault("router", {})["selection"] = "topk"
    return spec


def export_run(run_dir, out, *, fmt: str = "native", step: int | None = None, force: bool = False,
               force_resources: bool = False) -> Path:
    from upcycle.runtime.train_checkpoint import latest_checkpoint

    from upcycle.runtime.training.run_dir import checkpoint_dir, checkpoint_step

    from .atomic import check_output_location

    run_dir = Path(run_dir)
    check_output_location(out, force, [run_dir])  # the output's location first: before minutes of loading
    ckpt = latest_checkpoint(run_dir) if step is None else checkpoint_dir(run_dir, step)
    if ckpt is None or not (ckpt / ".metadata").is_file():
        raise UpcycleError(f"{run_dir}: no complete checkpoint{'' if step is None else f' for step {step}'} under checkpoints/")
    info = read_run_info(run_dir)
    model, spec = rebuild_run_model(run_dir, info, force_resources=force_resources)
    _load_weights(ckpt, model)
    relax_at = info.get("relax_routing_step")
    if relax_at is not None and checkpoint_step(ckpt) > relax_at:
        # the run switched per_slice routers to plain top-K before this checkpoint (the trainer)
        from upcycle.runtime import relax_routing

        relax_routing(model)
        spec = _relaxed(spec)
    model.eval()
    if fmt == "hf":
        from .export_hf import export_hf

        return export_hf(model, out, spec=spec, force=force, force_resources=force_resources)
    from .saving import save

    return save(model, out, spec=spec, force=force, force_resources=force_resources)


PROG = "upcycle-export-run"


def main(argv=None) -> int:
    """The exit code for `argv`; run as the console script (argv None) it is the whole process
    (failures.run_as_process: SIGTERM like Ctrl-C, exits at once)."""
    if argv is None:
        run_as_process(PROG, lambda: _run(None))
    return _run(argv)


def _run(argv) -> int:
    ap = argparse.ArgumentParser(prog="upcycle-export-run", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--format", default="native", choices=["native", "hf"])
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--force", action="store_true", help="replace an existing output folder (an earlier export)")
    ap.add_argument("--force-resources", action="store_true",
                    help="go ahead even if the pre-flight estimate of memory or disk space says it will not fit")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.output, fmt=args.format, step=args.step, force=args.force,
                         force_resources=args.force_resources)
    except (Exception, KeyboardInterrupt) as exc:
        return report(PROG, exc, debug=args.debug)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
