"""A training run's checkpoint -> an upcycle output folder or a transformers MoE checkpoint.

    upcycle-export-run RUN_DIR -o OUT [--format native|hf] [--step N] [--force]

The run folder written by examples/train.py holds run.json (the dense model's config and the
resolved spec, or the upcycled folder it started from) and DCP checkpoints. The model is rebuilt
without weights of its own (the saved rewrite replayed on the dense config), the checkpoint's model
weights are loaded into it (DCP reshards: a checkpoint from any number of ranks), and the result is
written with `upcycle.save` or the transformers export. The optimizer state is not read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.nn as nn

from .errors import UpcycleError


def rebuild_run_model(run_dir: Path) -> tuple[nn.Module, dict]:
    """The run's upcycled model with its initial weights, and its resolved spec."""
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise UpcycleError(f"{run_dir}: no run.json; not a run folder written by examples/train.py")
    info = json.loads(info_path.read_text())
    source = info.get("source", {})
    if source.get("kind") == "upcycled":
        from .saving import load
        from upcycle.specs import load_spec

        path = Path(source["path"])
        return load(path), load_spec(path / "upcycle_spec.yaml").to_dict()
    if not info.get("dense_config") or not info.get("spec"):
        raise UpcycleError(f"{info_path}: needs 'dense_config' and 'spec' to rebuild the model")
    from transformers import AutoConfig

    from .loading import build_transformers_skeleton
    from .pipeline import upcycle_model

    cfg = dict(info["dense_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    dense = build_transformers_skeleton(config)
    return upcycle_model(dense, info["spec"], structure_only=True).model, info["spec"]


def _relaxed(spec: dict) -> dict:
    spec = json.loads(json.dumps(spec))
    spec.setdefault("router", {})["selection"] = "topk"
    return spec


def export_run(run_dir, out, *, fmt: str = "native", step: int | None = None, force: bool = False) -> Path:
    from upcycle.runtime.train_checkpoint import latest_checkpoint, load_model_weights

    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir) if step is None else run_dir / "checkpoints" / f"step-{step:06d}"
    if ckpt is None or not (ckpt / ".metadata").is_file():
        raise UpcycleError(f"{run_dir}: no complete checkpoint{'' if step is None else f' for step {step}'} under checkpoints/")
    model, spec = rebuild_run_model(run_dir)
    load_model_weights(ckpt, model)
    relax_at = json.loads((run_dir / "run.json").read_text()).get("relax_routing_step")
    if relax_at is not None and int(ckpt.name.split("-")[-1]) > relax_at:
        # the run switched per_slice routers to plain top-K before this checkpoint (examples/train.py)
        from upcycle.runtime import relax_routing

        relax_routing(model)
        spec = _relaxed(spec)
    model.eval()
    if fmt == "hf":
        from .export_hf import export_hf

        return export_hf(model, out, spec=spec, force=force)
    from .saving import save

    return save(model, out, spec=spec, force=force)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="upcycle-export-run", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--format", default="native", choices=["native", "hf"])
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.output, fmt=args.format, step=args.step, force=args.force)
    except (UpcycleError, OSError, ValueError) as exc:
        print(f"upcycle-export-run: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
